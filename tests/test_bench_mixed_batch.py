"""Section 5 of the benchmark (one base, K adapters in one batch): output and sides, not speed."""

import numpy as np
import pytest

from loralab.bench import BenchConfig, run_bench
from loralab.bench.mlp import MLPArrays, engine_model
from loralab.bench.sections.mixed_batch import adapters_model, sides


def test_every_way_of_serving_computes_the_same_rows():
    rng = np.random.default_rng(0)
    arrays = MLPArrays.random(16, rng)
    x = rng.standard_normal((6, 16)).astype(np.float32)
    names = [f"t{i % 3}" for i in range(6)]
    model = adapters_model(arrays, 3, rng)
    base = engine_model(arrays, lora=False).eval()
    runs = sides(model, base, x, names, 3)
    assert sorted(runs) == ["base", "merge_swap", "mixed", "naive"]
    out = {name: run() for name, run in runs.items()}
    for name in ("naive", "merge_swap"):
        np.testing.assert_allclose(out[name], out["mixed"], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(out["mixed"], out["base"])  # B != 0: the adapters matter


def test_the_quick_section_reports_its_ratios(tmp_path):
    out = tmp_path / "results.md"
    res = run_bench(BenchConfig.tiny(), out, sections=("mixed_batch",), log=lambda s: None)
    text = out.read_text()
    assert "### 5. One base, K adapters in one batch" in text
    assert [r["K"] for r in res.mixed] == [1, 4]
    names = [c.name for c in res.checks]
    assert "mixed batch / base forward, K = 4" in names
    assert "naive loop / mixed batch, K = 4" in names
    assert all(c.value > 0 for c in res.checks)


def test_the_profile_times_every_part_before_and_now():
    from loralab.bench.sections.mixed_batch import PARTS, profile_layer

    prof = profile_layer(16, 8, 4, rank=2, repeats=1, sample_seconds=0.0)
    assert prof["base"] > 0
    assert sorted(prof["before"]) == sorted(prof["now"]) == sorted(PARTS)


def test_the_figure_is_drawn_from_the_section_alone(tmp_path):
    pytest.importorskip("matplotlib")
    from loralab.bench.figures import mixed_batch_figure

    res = run_bench(BenchConfig.tiny(), None, sections=("mixed_batch",), log=lambda s: None)
    assert all(r["bound"] > 1 for r in res.mixed)
    assert "one_adapter_over_base" in res.mixed[0]  # K = 1: the single-adapter floor
    assert mixed_batch_figure(res, tmp_path) == "mixed_batch.png"
    assert (tmp_path / "mixed_batch.png").stat().st_size > 0


@pytest.mark.parametrize("k", [4, 12])  # 12 adapters for 8 rows: four get none
def test_the_profile_runs_with_more_adapters_than_rows(k):
    from loralab.bench.sections.mixed_batch import PARTS, profile_layer

    prof = profile_layer(16, 8, k, rank=2, repeats=1, sample_seconds=0.0)
    assert sorted(prof["now"]) == sorted(PARTS)
    assert prof["now"]["down products x A^T"] > 0 and prof["now"]["up products U B^T + add"] > 0


def test_the_floors_and_the_plain_numpy_forward():
    """The plain-NumPy side computes the mixed batch's rows (in arrival order, as grouped once
    gives them); every floor is reported."""
    from loralab.bench.sections.mixed_batch import (
        bytes_floor_side,
        grouped_once_side,
        plain_numpy_side,
        products_alone_side,
    )

    rng = np.random.default_rng(1)
    arrays = MLPArrays.random(16, rng)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    names = [f"t{i % 4}" for i in range(8)]
    model = adapters_model(arrays, 4, rng)
    plain = plain_numpy_side(model, x, names)()
    np.testing.assert_allclose(plain, grouped_once_side(model, x, names)(), rtol=1e-6)
    products_alone_side(model, x, names)()
    bytes_floor_side(model, names)()
    res = run_bench(BenchConfig.tiny(), None, sections=("mixed_batch",), log=lambda s: None)
    row = res.mixed[-1]
    assert {"alone_over_base", "bytes_over_base", "plain_over_base"} <= set(row)
    assert row["alone_over_base"] > 1 and row["bytes_over_base"] > 1
    assert row["grouped_once_over_plain"] > 0 and row["base_over_plain_base"] > 0
    # a target missed by the engine's own work: the sentence gives it paired too
    from loralab.bench.sections.mixed_batch import TARGETS, _floor_markdown

    first = res.mixed[0]
    target = TARGETS[first["K"]]
    first.update(mixed_over_base=target + 0.2, grouped_once_over_base=target + 0.1)
    first.update(alone_over_base=target - 0.1, bytes_over_base=target - 0.2)
    first.update(in_place_over_base=target - 0.15)
    first.update(plain_over_base=target - 0.05, grouped_once_over_plain=1.125)
    first.update(base_over_plain_base=0.975)
    text = "\n".join(_floor_markdown(res))
    assert "The rest (0.150 of the base) is loralab's own work" in text
    assert "grouped once over plain NumPy is 1.125" in text and "plain NumPy's 0.975" in text


def test_numpy_over_peft_is_split_into_the_two_base_forwards():
    """With PEFT: the torch twin's base forward is timed too, and a missed NumPy / PEFT target
    gets a computed sentence whose verdict follows the plain-NumPy floor times the BLAS ratio."""
    pytest.importorskip("peft")
    from loralab.bench.sections.mixed_batch import PEFT_TARGET, _peft_floor

    res = run_bench(BenchConfig.tiny(), None, sections=("mixed_batch",), log=lambda s: None)
    row = res.mixed[-1]
    keys = ("grouped_once_over_peft", "numpy_base_over_torch_base", "peft_over_torch_base")
    assert all(row[k] > 0 for k in keys)
    names = [c.name for c in res.checks]
    assert "loralab NumPy (grouped once) / PEFT mixed batch, K = 4" in names
    row.update(numpy_over_peft=0.9, grouped_once_over_peft=0.85, numpy_base_over_torch_base=1.2)
    row.update(peft_over_torch_base=1.5, plain_over_base=1.05)  # 1.05 * 1.2 / 1.5 = 0.84
    text = _peft_floor(res)
    assert "missed (0.850 at best)" in text and "would be 0.840: above the target" in text
    row["plain_over_base"] = 0.95  # 0.76
    assert "would be 0.760: below the target" in _peft_floor(res)
    row["grouped_once_over_peft"] = PEFT_TARGET  # met: no sentence
    assert _peft_floor(res) == ""


@pytest.mark.parametrize("ranks", [None, [2, 4, 8]])  # stacked; ranks differ: not stacked
def test_the_bytes_in_place_read_every_adapter_where_the_mixed_forward_does(ranks):
    """The in-place floor computes the base forward's bits and reads each layer's adapters,
    A before the layer's base product and B^T (or each B) after it, once each."""
    from loralab.bench.mixed_parts import _plain_steps, bytes_in_place_side, plain_numpy_side

    rng = np.random.default_rng(2)
    arrays = MLPArrays.random(16, rng)
    k = 3
    x = rng.standard_normal((2 * k, 16)).astype(np.float32)
    names = [f"t{i % k}" for i in range(x.shape[0])]
    model = adapters_model(arrays, k, rng, ranks)
    seen = []
    out = bytes_in_place_side(model, x, names, read=lambda a: seen.append(a))()
    np.testing.assert_array_equal(out, plain_numpy_side(model, x, names, base=True)())
    expected = []
    for step in _plain_steps(model, names):
        if step is None:
            continue
        stack = step[6]
        assert (stack is None) == (ranks is not None)
        expected += [stack[0].A, stack[0].Bt] if stack is not None else [*step[3], *step[4]]
    assert len(seen) == len(expected) == (2 if ranks is None else 2 * k) * 4
    assert all(a is b for a, b in zip(seen, expected, strict=True))


def test_read_bandwidth_is_a_rate_and_checks_its_size():
    from loralab.bench.mixed_parts import read_bandwidth

    assert read_bandwidth(0.25, repeats=2, min_seconds=0.0) > 0
    with pytest.raises(ValueError, match="mib must be > 0, got 0"):
        read_bandwidth(0)


def test_a_floor_read_in_place_above_the_target_is_the_floor_that_stops_it():
    from loralab.bench.sections.mixed_batch import TARGETS, _checks, _floor_markdown

    res = run_bench(BenchConfig.tiny(), None, sections=("mixed_batch",), log=lambda s: None)
    row = res.mixed[0]
    assert row["in_place_over_base"] > 0 and row["weights_mib"] > 0
    assert row["read_gib_s"] > 0 and row["read_gib_s_small"] > 0
    target = TARGETS[row["K"]]
    row.update(mixed_over_base=target + 0.2, grouped_once_over_base=target + 0.1)
    row.update(alone_over_base=target - 0.1, bytes_over_base=target - 0.2)
    row.update(in_place_over_base=target + 0.05, plain_over_base=target + 0.08)
    row.update(weights_mib=80.0, read_gib_s=14.0, read_gib_s_small=27.0)
    text = "\n".join(_floor_markdown(res))
    assert (
        f"the same read in place, between the base products where the mixed forward reads the adapters, {target + 0.05:.3f}"
        in text
    )
    assert "80 MiB, stream at 14.0 GiB/s, against 27.0 GiB/s over 4 MiB" in text
    assert (
        f"{target + 0.05:.3f} (" in text and "): above the target, the floor that stops it." in text
    )
    row["in_place_over_base"] = target - 0.01  # below: the plain-NumPy forward decides
    row.update(grouped_once_over_plain=1.02, base_over_plain_base=1.01)
    text = "\n".join(_floor_markdown(res))
    assert "The same mixed forward over the same base forward" in text
    assert "the floor that stops it. loralab's own work around the op adds 0.020 of" in text
    assert (
        "grouped once over plain NumPy is 1.020, and the engine's base over plain NumPy's 1.010"
        in text
    )
    res.checks.clear()
    _checks(res)  # a missed target lists every floor among the checks
    names = [c.name for c in res.checks]
    assert f"floor: base + the adapters read in place / base, K = {row['K']}" in names
