"""Section 5, one base serving many adapters: a mixed batch against the other ways to serve it.

A batch of ``mixed_batch`` requests spread round-robin over K adapters (r = 8 on each of the
four Linear layers) is served these ways, alternating, with no gradient:

- **base**: the base model alone (the floor: what serving costs without adapters);
- **mixed**: `loralab.lora.mixed_batch` on the rows as they arrive: the rows sorted by adapter
  once per batch, the base once on the whole batch and the grouped op (`loralab.lora.grouped`)
  for the K low-rank parts, each layer gathering its input into the sorted order and back;
- **grouped once**: the same, with the batch grouped by adapter once before the model
  (`loralab.lora.adapter_order`, as Punica and S-LoRA form their batches) and put back in
  arrival order after it: no layer gathers anything;
- **naive**: a loop over the adapters, each on its own rows (K smaller batches through the
  whole model; the active adapter switched by setting the layers' active list, as inference
  needs no requires_grad change);
- **merge-swap**: per adapter, merge it into W0, run its rows, unmerge (K merges of every layer
  per batch; only for K <= 16, it grows too slow to repeat beyond);

and, when torch and PEFT are installed, loralab's NumPy mixed batch against PEFT's mixed-batch
forward (``model(x, adapter_names=...)``) on the torch twin, same threads. Next to each ratio:
the FLOP bound 1 + r (d + k) / (d k), and two floors measured alone, each added to the base:
the low-rank products of every layer and nothing else (the K adapters' batched products on
the stacked weights, `loralab.lora.stacked`, with no base, gather, Tensor or Function), and
the bytes: one streaming read of every layer's K adapters (K x 64 KiB at r = 8, d = 1024,
float32), which any way of serving the batch must do. The same read is timed in place too,
between the base products where the mixed forward reads the adapters: there the base's weights
and the adapters' share the CPU's caches, and when they do not fit, the read comes from main
memory (`read_bandwidth` gives both rates). One more row mixes adapters of different ranks.

`profile_layer` times the parts of one layer's mixed forward alone, the way it was (a sort in
every layer, a gather ``x[rows]`` and a scatter ``y[rows] +=`` per adapter) and the way it is
now (one batched product per layer on the stacked adapters); tutorial 12 draws the same profile.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from loralab.bench.config import ALPHA, N_LAYERS, RANK, Check, Results
from loralab.bench.machine import optional_torch
from loralab.bench.mixed_parts import (
    PARTS,
    bytes_floor_side,
    bytes_in_place_side,
    plain_numpy_side,
    products_alone_side,
    profile_layer,
    read_bandwidth,
)
from loralab.bench.mlp import LINEAR_NAMES, MLPArrays, engine_model
from loralab.bench.sections._table import shown, table
from loralab.bench.timing import CLOCKS, paired_ratio, time_alternating
from loralab.lora import (
    adapter_order,
    inject_lora,
    lora_layers,
    merge_lora,
    mixed_batch,
    unmerge_lora,
)
from loralab.lora import stacked as ST
from loralab.tensor import no_grad

TARGET_K = 16  # the K at which the naive, merge-swap and PEFT comparisons are checked
MERGE_SWAP_MAX_K = 16
TARGETS = {1: 1.08, 16: 1.10, 64: 1.20, 256: 1.35}  # mixed / base forward, by K (issue 21)
PEFT_TARGET = 0.8  # loralab NumPy / PEFT's mixed batch at TARGET_K
MIXED_RANKS = (4, 8, 16, 32)  # the row whose adapters differ in rank: adapter i has r = [i % 4]
PROFILE_KS = (1, 16, 64, 256)
REWARM = True
"""Each timed sample follows one untimed call of its side (`time_alternating`): the naive loop
and merge-swap leave the caches full of other data, and the side timed after them would pay
for fetching back its weights in a way the one after the base does not."""

SMALL_READ_MIB = 4.0  # a buffer the CPU's caches hold, for read_bandwidth's comparison
FLOORS = ("alone", "bytes", "plain")  # products alone; one read of the adapters; plain NumPy


def flop_bound(ranks: Sequence[int], width: int) -> float:
    """1 + r (d + k) / (d k) for a Linear(width, width), r the mean rank over the batch's rows."""
    return 1.0 + float(np.mean(ranks)) * 2 * width / (width * width)


def adapters_model(
    arrays: MLPArrays, k: int, rng: np.random.Generator, ranks: Sequence[int] | None = None
) -> Any:
    """The base MLP with K adapters ``t0 .. t{K-1}`` on every Linear, B nonzero.

    Adapter i has rank ``ranks[i % len(ranks)]`` (default: RANK for all) and alpha = ALPHA.
    """
    model = engine_model(arrays, lora=False)
    ranks = list(ranks or [RANK])
    for i in range(k):
        r = ranks[i % len(ranks)]
        inject_lora(model, LINEAR_NAMES, r=r, alpha=ALPHA, seed=i, adapter_name=f"t{i}")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            B = layer.adapter(name).lora_B
            B.data = (0.01 * rng.standard_normal(B.shape)).astype(B.dtype)
    return model.eval()


def _activate(model: Any, name: str) -> None:
    for _, layer in lora_layers(model):
        layer.active_adapter_names = [name]


def sides(model: Any, base: Any, x: np.ndarray, names: list[str], k: int) -> dict[str, Callable]:
    """The ways to serve the batch ``x`` (n, width) whose row i asks for adapter ``names[i]``.

    Each side, called, returns its output of shape (n, width) (``base``: the base model's).
    """
    groups = [(f"t{j}", np.flatnonzero(np.array(names) == f"t{j}")) for j in range(k)]
    out_width = x.shape[1]

    def run_base() -> np.ndarray:
        with no_grad():
            return base(x).data

    def run_mixed() -> np.ndarray:
        with no_grad(), mixed_batch(model, names):
            return model(x).data

    def run_naive() -> np.ndarray:
        y = np.empty((x.shape[0], out_width), dtype=x.dtype)
        with no_grad():
            for name, rows in groups:
                _activate(model, name)
                y[rows] = model(x[rows]).data
        return y

    def run_merge_swap() -> np.ndarray:
        y = np.empty((x.shape[0], out_width), dtype=x.dtype)
        with no_grad():
            for name, rows in groups:
                _activate(model, name)
                merge_lora(model)
                y[rows] = model(x[rows]).data
                unmerge_lora(model)
        return y

    out = {"base": run_base, "mixed": run_mixed, "naive": run_naive}
    if k <= MERGE_SWAP_MAX_K:
        out["merge_swap"] = run_merge_swap
    return out


def grouped_once_side(model: Any, x: np.ndarray, names: list[str]) -> Callable[[], np.ndarray]:
    """The mixed batch with its rows grouped by adapter once before the model (`adapter_order`)
    and put back in arrival order after it; returns the same rows as `sides`' ``mixed``."""
    order, inverse = adapter_order(names)
    grouped = [names[i] for i in order]
    if (order == np.arange(order.size)).all():  # already grouped (K = 1): nothing to move

        def run() -> np.ndarray:
            with no_grad(), mixed_batch(model, grouped):
                return model(x).data

        return run

    def run_grouped() -> np.ndarray:
        with no_grad(), mixed_batch(model, grouped):
            return model(x[order]).data[inverse]

    return run_grouped


def one_adapter_side(model: Any, x: np.ndarray) -> Callable[[], np.ndarray]:
    """Adapter t0 alone, active and unmerged (the fused single-adapter op, no mixed batch): what
    a mixed batch whose rows all ask for one adapter cannot beat."""

    def run() -> np.ndarray:
        _activate(model, "t0")
        with no_grad():
            return model(x).data

    return run


def peft_side(
    base: Any, k: int, x: np.ndarray, names: list[str], ranks: Sequence[int] | None = None
) -> Callable | None:
    """PEFT's mixed-batch forward on the torch twin with K adapters (adapter i of rank
    ``ranks[i % len(ranks)]``, default RANK); None without torch or PEFT."""
    torch = optional_torch()
    try:
        import peft
    except ImportError:
        return None
    if torch is None:
        return None
    from loralab.torch import to_torch

    ranks = list(ranks or [RANK])

    def config(i: int) -> Any:
        r = ranks[i % len(ranks)]
        return peft.LoraConfig(r=r, lora_alpha=ALPHA, target_modules=list(LINEAR_NAMES))

    pm = peft.get_peft_model(to_torch(base), config(0), adapter_name="t0")
    for i in range(1, k):
        pm.add_adapter(f"t{i}", config(i))
    pm.eval()
    xt = torch.from_numpy(x)

    def run() -> None:
        with torch.no_grad():
            pm(xt, adapter_names=names)

    return run


def torch_base_side(base: Any, x: np.ndarray) -> Callable | None:
    """The base model's forward on its torch twin (`loralab.torch.to_torch`, no adapter, no
    gradient) of the batch x (n, width): what PEFT's mixed batch runs on, so that NumPy / PEFT can be split into the two
    libraries' base forwards (their BLAS) and each one's overhead over its base. None without
    torch."""
    torch = optional_torch()
    if torch is None:
        return None
    from loralab.torch import to_torch

    twin = to_torch(base).eval()
    xt = torch.from_numpy(x)

    def run() -> None:
        with torch.no_grad():
            twin(xt)

    return run


# ----- the section -------------------------------------------------------------------------------
def _measure(
    res: Results,
    arrays: MLPArrays,
    base: Any,
    x: np.ndarray,
    k: int,
    rng: np.random.Generator,
    ranks: Sequence[int] | None = None,
) -> dict[str, Any]:
    cfg = res.config
    batch, width = x.shape
    names = [f"t{i % k}" for i in range(batch)]
    model = adapters_model(arrays, k, rng, ranks)
    timed = sides(model, base, x, names, k)
    if ranks is not None:  # the ranks row: the two loralab ways, the base and PEFT only
        timed = {s: timed[s] for s in ("base", "mixed")}
    timed["grouped_once"] = grouped_once_side(model, x, names)
    timed["alone"] = products_alone_side(model, x, names)
    if ranks is None:
        timed["bytes"] = bytes_floor_side(model, names)
        timed["in_place"] = bytes_in_place_side(model, x, names)
        timed["plain"] = plain_numpy_side(model, x, names)
        timed["plain_base"] = plain_numpy_side(model, x, names, base=True)
    if k == 1:
        timed["one_adapter"] = one_adapter_side(model, x)
    peft_run = peft_side(base, k, x, names, ranks)
    if peft_run is not None:
        timed["peft"] = peft_run
        torch_base = torch_base_side(base, x) if ranks is None else None
        if torch_base is not None:
            timed["torch_base"] = torch_base
    times = time_alternating(
        timed, cfg.repeats, cfg.sample_seconds, CLOCKS[cfg.clock], rewarm=REWARM
    )
    rank_cycle = list(ranks or [RANK])
    adapter_ranks = [rank_cycle[i % len(rank_cycle)] for i in range(k)]
    row: dict[str, Any] = {
        "K": k,
        "batch": batch,
        "ranks": sorted(set(adapter_ranks)),
        "bound": flop_bound([adapter_ranks[i % k] for i in range(batch)], width),
    }
    for side, t in times.items():
        row[f"{side}_us_per_row"] = 1e6 * statistics.median(t) / batch
    for side in ("mixed", "grouped_once", *FLOORS):
        if side in times:
            row[f"{side}_over_base"] = paired_ratio(times[side], times["base"])
    for side in FLOORS[:2]:  # the base plus the floor: what mixed / base cannot go under
        if f"{side}_over_base" in row:
            row[f"{side}_over_base"] += 1.0
    if "plain" in times:  # the mixed forward over the base forward, both plain NumPy
        row["plain_over_base"] = paired_ratio(times["plain"], times["plain_base"])
        # the engine's own work timed straight against the same method without it, and the
        # two bases against each other (their difference is noise in "own work" above)
        row["grouped_once_over_plain"] = paired_ratio(times["grouped_once"], times["plain"])
        row["base_over_plain_base"] = paired_ratio(times["base"], times["plain_base"])
    if "in_place" in times:  # the bytes read where the method reads them, over the same base
        row["in_place_over_base"] = paired_ratio(times["in_place"], times["plain_base"])
        # why it can cost more than the bytes read alone: the weights one forward reads (the
        # base's and the K adapters') against the CPU's caches, as a streaming read's rate
        mib = sum(p.data.nbytes for p in model.parameters()) / 2**20
        row["weights_mib"] = mib
        row["read_gib_s"] = read_bandwidth(mib)
        row["read_gib_s_small"] = read_bandwidth(min(mib, SMALL_READ_MIB))
    if "one_adapter" in times:
        row["one_adapter_over_base"] = paired_ratio(times["one_adapter"], times["base"])
    if "naive" in times:
        row["naive_over_mixed"] = paired_ratio(times["naive"], times["mixed"])
    if "merge_swap" in times:
        row["merge_swap_over_mixed"] = paired_ratio(times["merge_swap"], times["mixed"])
    if "peft" in times:
        row["numpy_over_peft"] = paired_ratio(times["mixed"], times["peft"])
        row["grouped_once_over_peft"] = paired_ratio(times["grouped_once"], times["peft"])
    if "torch_base" in times:  # NumPy / PEFT = (NumPy base / torch base) x (mixed / base) / ...
        row["numpy_base_over_torch_base"] = paired_ratio(times["base"], times["torch_base"])
        row["peft_over_torch_base"] = paired_ratio(times["peft"], times["torch_base"])
    return row


def run(res: Results, log: Callable[[str], None]) -> None:
    """Time the ways of serving a mixed batch for each K, alternating; then the per-part profile."""
    cfg = res.config
    width, batch = cfg.core_width, cfg.mixed_batch
    rng = np.random.default_rng(cfg.seed + 5)
    arrays = MLPArrays.random(width, rng)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    base = engine_model(arrays, lora=False).eval()
    log(f"[5] serving K adapters in one batch of {batch}: K = {list(cfg.mixed_ks)}")
    for k in cfg.mixed_ks:
        res.mixed.append(_measure(res, arrays, base, x, k, rng))
    k_ranks = min(TARGET_K, max(cfg.mixed_ks))
    log(f"[5] ... and K = {k_ranks} adapters of ranks {list(MIXED_RANKS)} in one batch")
    res.mixed_ranks.append(_measure(res, arrays, base, x, k_ranks, rng, MIXED_RANKS))
    profile_ks = [k for k in PROFILE_KS if k in cfg.mixed_ks] or list(cfg.mixed_ks)
    log(f"[5] ... and the profile of one layer, K = {profile_ks}")
    for k in profile_ks:
        prof = profile_layer(
            width,
            batch,
            k,
            repeats=cfg.repeats,
            sample_seconds=cfg.sample_seconds / 4,
            clock=CLOCKS[cfg.clock],
            threads=None,  # the suite's count, set by run_bench
            seed=cfg.seed,
        )
        res.mixed_profile.append({"K": k, **prof})
    _checks(res)


def _checks(res: Results) -> None:
    for row in res.mixed:
        k = row["K"]
        target = TARGETS.get(k)
        for side, how in (("mixed", "rows as they arrive"), ("grouped_once", "grouped once")):
            value = row[f"{side}_over_base"]
            name = (
                "mixed batch / base forward" if side == "mixed" else f"mixed batch ({how}) / base"
            )
            res.checks.append(
                Check(
                    "5",
                    f"{name}, K = {k}",
                    value,
                    f"<= {target:.2f}" if target else "report",
                    value <= target if target else None,
                )
            )
        if target and min(row["mixed_over_base"], row["grouped_once_over_base"]) > target:
            res.checks.append(
                Check(
                    "5",
                    f"floor: base + the low-rank products alone / base, K = {k}",
                    row["alone_over_base"],
                    "report",
                    note="what stops the target",
                )
            )
            if "bytes_over_base" in row:
                res.checks.append(
                    Check(
                        "5",
                        f"floor: base + one read of the K adapters / base, K = {k}",
                        row["bytes_over_base"],
                        "report",
                    )
                )
            if "in_place_over_base" in row:
                res.checks.append(
                    Check(
                        "5",
                        f"floor: base + the adapters read in place / base, K = {k}",
                        row["in_place_over_base"],
                        "report",
                    )
                )
            if "plain_over_base" in row:
                res.checks.append(
                    Check(
                        "5",
                        f"floor: mixed / base forward as plain NumPy calls, K = {k}",
                        row["plain_over_base"],
                        "report",
                    )
                )
    row = _target_row(res)
    target_k = row["K"]
    res.checks.append(
        Check("5", f"naive loop / mixed batch, K = {target_k}", row["naive_over_mixed"], "report")
    )
    if "merge_swap_over_mixed" in row:
        res.checks.append(
            Check(
                "5",
                f"merge-swap / mixed batch, K = {target_k}",
                row["merge_swap_over_mixed"],
                "report",
            )
        )
    for key, how in (("numpy_over_peft", ""), ("grouped_once_over_peft", " (grouped once)")):
        if key in row:
            res.checks.append(
                Check(
                    "5",
                    f"loralab NumPy{how} / PEFT mixed batch, K = {target_k}",
                    row[key],
                    f"<= {PEFT_TARGET}",
                    row[key] <= PEFT_TARGET,
                )
            )
    if "numpy_base_over_torch_base" in row:
        res.checks.append(
            Check(
                "5",
                f"NumPy base forward / PyTorch base forward (the K = {target_k} timings)",
                row["numpy_base_over_torch_base"],
                "report",
            )
        )
    for row in res.mixed_ranks:
        res.checks.append(
            Check(
                "5",
                f"mixed batch / base forward, K = {row['K']}, ranks {row['ranks']}",
                row["mixed_over_base"],
                "report",
            )
        )


def _fmt(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.3f}" if key in row else "-"


def _profile_markdown(res: Results) -> list[str]:
    if not res.mixed_profile:
        return []
    header = ["part (% of the base product)"]
    for p in res.mixed_profile:
        header += [f"K = {p['K']} before", f"K = {p['K']} now"]
    rows = []
    for part in PARTS:
        cells = [part]
        for p in res.mixed_profile:
            for when in ("before", "now"):
                cells.append(f"{100 * p[when][part] / p['base']:.1f}%")
        rows.append(cells)
    total = ["total"]
    for p in res.mixed_profile:
        for when in ("before", "now"):
            total.append(f"**{100 * sum(p[when].values()) / p['base']:.1f}%**")
    rows.append(total)
    cfg = res.config
    return [
        f"Where the time of one layer goes (Linear({cfg.core_width}, {cfg.core_width}), batch "
        f"{cfg.mixed_batch}, r = {RANK}; each part timed alone, as a share of the layer's base product x W0^T + b). Before: a sort in every "
        "layer, then per adapter a gather x[rows], x_k A_k^T, s (u_k B_k^T) and a scatter "
        "y[rows] +=. Now: one sort per batch shared by the 4 layers; the adapters stacked "
        "(A (K, r, in), B^T (K, r, out), `loralab.lora.stacked`); the batch sorted into the "
        "(K, c, in) block and the output put back, one gather each way (none when the rows come "
        "grouped); one batched down product and one batched up product for all K adapters (at "
        "K = 1, 256 rows per adapter, one product pair, as before). The parts do not add up to a "
        "whole layer: run alone, each finds its data in the CPU's cache.",
        "",
        table(header, rows),
        "",
    ]


def _floor_markdown(res: Results) -> list[str]:
    """Sentences, computed, for each target that the measured ratios miss: the two floors and
    which of them (if any) is above the target."""
    out = []
    kib = 2 * RANK * res.config.core_width * 4 // 1024  # one adapter's A and B, float32
    for row in res.mixed:
        target = TARGETS.get(row["K"])
        best = min(row["mixed_over_base"], row["grouped_once_over_base"])
        if target is None or best <= target:
            continue
        k = row["K"]
        rows_each = max(1, row["batch"] // k)
        how = (
            "one product pair per adapter"
            if rows_each > ST.MAX_ROWS_PER_SLOT
            else "one batched product per layer on the stacked adapters"
        )
        text = (
            f"- K = {k} ({rows_each} row{'s' if rows_each > 1 else ''} per adapter): target "
            f"{target:.2f} missed ({shown(best, target)} at best). Floors, each the base plus one thing "
            f"alone: the low-rank products of every layer ({how}) {row['alone_over_base']:.3f}"
        )
        if "bytes_over_base" in row:
            mib = k * kib * N_LAYERS / 1024
            text += (
                f"; one read of every layer's {k} adapters ({kib} KiB each, {mib:g} MiB per "
                f"forward) {row['bytes_over_base']:.3f}"
            )
        if "in_place_over_base" in row:
            text += (
                f"; the same read in place, between the base products where the mixed forward "
                f"reads the adapters, {row['in_place_over_base']:.3f} (the weights one forward "
                f"reads, base and adapters, {row['weights_mib']:.3g} MiB, stream at "
                f"{row['read_gib_s']:.1f} GiB/s, against {row['read_gib_s_small']:.1f} GiB/s "
                f"over {min(row['weights_mib'], SMALL_READ_MIB):g} MiB, which the CPU's caches "
                "hold)"
            )
        floors = [row["alone_over_base"], row.get("bytes_over_base", 0.0)]
        floors.append(row.get("in_place_over_base", 0.0))
        plain = row.get("plain_over_base")
        if max(floors) > target:
            text += ": above the target, the floor that stops it."
        elif plain is not None and plain > target:
            text += (
                f". The same mixed forward over the same base forward, both as plain NumPy "
                f"calls (no engine; the rows grouped and put back as grouped once does), is "
                f"{plain:.3f}: above the target. "
                f"Beyond the floors, the products as NumPy calls ({how}, each added into the "
                "base's output: a fused kernel would do both in one pass), and the rows grouped "
                "and put back where they arrive mixed, cost that much in NumPy on this "
                "machine: the floor that stops it."
            )
            if "grouped_once_over_plain" in row and best > plain:
                text += (
                    f" loralab's own work around the op adds {best - plain:.3f} of the base "
                    "on top (timed straight against each other in pairs, grouped once over "
                    f"plain NumPy is {row['grouped_once_over_plain']:.3f}, and the engine's "
                    f"base over plain NumPy's {row['base_over_plain_base']:.3f})."
                )
        else:
            text += (
                "; the same mixed over base forward as plain NumPy calls (no engine) "
                + (f"{plain:.3f}" if plain is not None else "-")
                + f": below the target. The rest ({best - (plain or max(floors)):.3f} of the "
                "base) is loralab's own work around the op (the engine's Tensors and Functions, "
                "the routing, the checks): not a floor of the method."
            )
            if "grouped_once_over_plain" in row:
                text += (
                    " Timed straight against each other in pairs, grouped once over plain NumPy "
                    f"is {row['grouped_once_over_plain']:.3f}, and the engine's base over plain "
                    f"NumPy's {row['base_over_plain_base']:.3f}."
                )
        if "one_adapter_over_base" in row:
            text += (
                f" One adapter alone, active and unmerged (no mixed batch: the fused LoRA op), "
                f"costs {row['one_adapter_over_base']:.3f} of the base: the mixed batch at K = 1 "
                "does the same work."
            )
        out.append(text)
    peft = _peft_floor(res)
    if peft:
        out.append(peft)
    if not out:
        return []
    return ["Where a target is missed, the measured floors:", "", *out, ""]


def _target_row(res: Results) -> dict[str, Any]:
    """The row of K = TARGET_K, where the naive, merge-swap and PEFT comparisons are checked
    (the largest K measured when TARGET_K was not)."""
    return next((r for r in res.mixed if r["K"] == TARGET_K), res.mixed[-1])


def _peft_floor(res: Results) -> str:
    """The sentence, computed, for a missed NumPy / PEFT target: the ratio split into the two
    base forwards and each library's mixed batch over its own base, and what the plain-NumPy
    mixed forward would give. Empty when the target is met or the parts were not measured."""
    row = _target_row(res)
    target_k = row["K"]
    if "numpy_base_over_torch_base" not in row:
        return ""
    best = min(row["numpy_over_peft"], row["grouped_once_over_peft"])
    if best <= PEFT_TARGET:
        return ""
    blas, peft = row["numpy_base_over_torch_base"], row["peft_over_torch_base"]
    text = (
        f"- NumPy / PEFT at K = {target_k}: target {PEFT_TARGET} missed ({shown(best, PEFT_TARGET)} at best). "
        f"The ratio is (NumPy base / torch base) x (NumPy mixed / NumPy base) / (PEFT / torch "
        f"base). NumPy's base forward costs {blas:.3f} of the torch twin's (the same products, "
        f"each library's BLAS: the Machine table), and PEFT's mixed batch {peft:.3f} of that "
        "torch base"
    )
    plain = row.get("plain_over_base")
    if plain is None:
        return text + "."
    floor = plain * blas / peft
    text += (
        f". At the plain-NumPy floor ({plain:.3f} of its base, no engine) the ratio would be "
        f"{floor:.3f}"
    )
    if floor > PEFT_TARGET:
        return (
            text + ": above the target, the floor that stops it (NumPy's BLAS against PyTorch's)."
        )
    return text + (
        ": below the target. The rest is loralab's own work around the op, as for the K rows: "
        "not a floor of the method."
    )


def markdown(res: Results) -> list[str]:
    """The section's heading, what each side is, the table and the profile."""
    if not res.mixed:
        return []
    cfg = res.config
    rows = [
        [
            str(r["K"])
            + ("" if r["ranks"] == [RANK] else f" (r = {', '.join(map(str, r['ranks']))})"),
            f"{r['bound']:.3f}",
            f"{r['base_us_per_row']:.1f} us",
            f"{r['mixed_us_per_row']:.1f} us",
            _fmt(r, "mixed_over_base"),
            _fmt(r, "grouped_once_over_base"),
            _fmt(r, "alone_over_base"),
            _fmt(r, "bytes_over_base"),
            _fmt(r, "in_place_over_base"),
            _fmt(r, "plain_over_base"),
            _fmt(r, "naive_over_mixed"),
            _fmt(r, "merge_swap_over_mixed"),
            _fmt(r, "numpy_over_peft"),
        ]
        for r in res.mixed + res.mixed_ranks
    ]
    return [
        f"### 5. One base, K adapters in one batch (4 x Linear({cfg.core_width}, "
        f"{cfg.core_width}), batch {cfg.mixed_batch}, r = {RANK}, no gradient)",
        "",
        "Rows spread round-robin over K adapters. Each timed sample follows one untimed call "
        "of its side, so that no side pays for what the side before it left in the caches. "
        "Every call serves the same rows, as the steps of a decode loop do: `mixed_batch` "
        "works out their routing for the first and reuses it (a NumPy model remembers the last "
        "batch's routing until it is edited). "
        "bound: 1 + r (d + k) / (d k), the adapters' "
        "share of the multiply-adds. mixed: `mixed_batch` on the rows as they arrive (sorted by "
        "adapter once per batch; each layer gathers the rows it needs, per adapter, and adds the "
        "products back into them); grouped once: "
        "the batch grouped by adapter before the model (`adapter_order`) and put back after it; "
        "floor: the base plus each layer's low-rank products alone (batched on the stacked "
        "adapters); bytes: the base plus one read of every layer's K adapters; in place: the "
        "same read between the base products, where the mixed forward reads the adapters (the "
        "plain-NumPy base plus the reads, over the plain-NumPy base); plain NumPy: the "
        "grouped-once mixed forward over the base forward, both as plain NumPy calls (no "
        "engine; the rows grouped before the layers and put back after them, as grouped once "
        "does; the base needs neither); naive: a loop over "
        f"adapters, each on its rows; merge-swap: merge, run the adapter's rows, unmerge (K <= "
        f"{MERGE_SWAP_MAX_K}); PEFT: its mixed-batch forward on the torch twin (NumPy / PEFT: "
        "the rows as they arrive; the summary also has grouped once / PEFT, and NumPy's base "
        "forward over the torch twin's, each library on its own BLAS). The last row mixes "
        "adapters of different ranks in one batch.",
        "",
        table(
            [
                "K",
                "bound",
                "base per row",
                "mixed per row",
                "mixed / base",
                "grouped once / base",
                "floor / base",
                "bytes / base",
                "in place / base",
                "plain NumPy / base",
                "naive / mixed",
                "merge-swap / mixed",
                "NumPy / PEFT",
            ],
            rows,
        ),
        "",
        *_floor_markdown(res),
        *_profile_markdown(res),
    ]
