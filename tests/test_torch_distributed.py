"""Data-parallel fine-tuning on torch.distributed: N processes equal one, the hook counts what DDP sends.

Every test here that starts processes (2 gloo ranks on 127.0.0.1) pays about 3-10 s of start-up
(each rank imports torch), so the runs are shared through one module fixture where they can be.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loralab import counting  # noqa: E402
from loralab.cli import main as cli_main  # noqa: E402
from loralab.torch import distributed as D  # noqa: E402
from loralab.torch import save_adapter  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.distributed]

STEPS = 4
ROUND_OFF = 1e-12  # float64, a few Adam steps: measured differences are about 1e-15


def rank_processes() -> set[int]:
    """Live descendants of this process that are ranks (multiprocessing's spawned children).

    multiprocessing's resource tracker (one per parent, for its whole life) is not a rank.
    """
    import psutil

    found = set()
    for child in psutil.Process().children():  # the ranks are direct children
        try:
            if child.is_running() and "resource_tracker" not in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def cli_gpt():
    """``loralab ddp --model gpt --json``, started in the background: it runs beside `mlp_runs`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loralab", "ddp", "--nproc", "2", "--json", "--model", "gpt"]
        + ["--steps", "3", "--batch", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def mlp_runs(cli_gpt):
    """LoRA and full fine-tuning of the digits MLP on 2 processes, plus full with small buckets.

    Started while `cli_gpt` runs: two runs at once on this machine, each with its own port.
    """
    runs = [
        D.RunConfig(model="mlp", steps=STEPS),
        D.RunConfig(model="mlp", full=True, steps=STEPS),
        D.RunConfig(model="mlp", full=True, steps=STEPS, bucket_cap_mb=0.2),
    ]
    return runs, D.train_ddp(runs, nproc=2, timeout=240)


def test_two_processes_on_half_batches_equal_one_process_on_the_whole_batch(mlp_runs):
    runs, results = mlp_runs
    for run, ddp in zip(runs, results):
        initial = {n: p.detach().numpy() for n, p in D.build_model(run).named_parameters()}
        assert ddp.max_param_diff({n: initial[n] for n in ddp.params}) > 1e-3  # it trained
        single = D.train_single(run)
        assert ddp.max_param_diff(single.params) < ROUND_OFF
        assert ddp.replica_diff == 0.0  # DDP keeps the replicas identical
        np.testing.assert_allclose(ddp.losses, single.losses, rtol=ROUND_OFF)


def test_the_comparison_can_fail_one_shard_alone_is_not_the_whole_batch(mlp_runs):
    runs, results = mlp_runs
    alone = D.train_rank(runs[0], rank=0, world_size=2)  # rank 0's half, no all-reduce
    assert results[0].max_param_diff(alone.params) > 1e3 * ROUND_OFF


def test_hook_counts_the_bytes_the_shapes_predict_bucket_by_bucket(mlp_runs):
    runs, results = mlp_runs
    for run, ddp in zip(runs, results):
        model = D.build_model(run)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert not list(model.buffers())  # nothing else travels: DDP broadcasts buffers only
        predicted = D.predicted_allreduce_bytes(model)
        assert ddp.allreduce_bytes == [predicted] * run.steps
        for step in ddp.buckets:
            assert sum(bk.tensors for bk in step) == len(trainable)
            assert sum(bk.numel for bk in step) == sum(p.numel() for p in trainable)
            assert sorted(bk.index for bk in step) == list(range(len(step)))
    lora, full, small = results
    # By hand: LoRA on every (out, in) Linear of 64-256-256-10 trains r (out + in); float64.
    shapes = [(256, 64), (256, 256), (10, 256)]
    assert lora.allreduce_bytes_per_step == 8 * sum(4 * (d + k) for d, k in shapes)
    assert full.allreduce_bytes_per_step == 8 * sum(d * k + d for d, k in shapes)
    # Smaller buckets: more all-reduce calls after DDP rebuilds its buckets, the same bytes.
    assert len(small.buckets[-1]) > len(full.buckets[-1])
    assert small.allreduce_bytes_per_step == full.allreduce_bytes_per_step


def test_adapter_trained_on_two_processes_loads_in_peft_with_equal_outputs(mlp_runs, tmp_path):
    peft = pytest.importorskip("peft")
    runs, results = mlp_runs
    trained = results[0].trained_model().eval()
    save_adapter(trained, tmp_path)
    base = D.build_model(runs[1])  # the same pre-trained MLP, no adapter
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    x = torch.as_tensor(D.global_batches(runs[0])[0][0])
    with torch.no_grad():
        ours, theirs = trained(x), loaded(x)
        np.testing.assert_allclose(theirs.numpy(), ours.numpy(), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(ours, D.build_model(runs[1])(x))  # the adapter matters


def test_cli_json_while_another_run_trains_at_the_same_time(cli_gpt, mlp_runs):
    """`loralab ddp --json` (the GPT, LoRA) ran beside the MLP runs: neither collided."""
    out, err = cli_gpt.communicate(timeout=240)
    assert cli_gpt.returncode == 0, err
    result = json.loads(out)
    for key in (
        "max_param_diff_vs_single",
        "allreduce_bytes_per_step_lora",
        "allreduce_bytes_per_step_full",
        "trainable_params",
        "total_params",
    ):
        assert key in result
    assert result["mode"] == "lora" and result["model"] == "gpt"
    assert result["max_param_diff_vs_single"] < ROUND_OFF
    assert result["allreduce_bytes_per_step_lora"] == result["predicted_bytes_lora"]
    assert result["allreduce_bytes_per_step_full"] == result["predicted_bytes_full"]
    ratio = result["allreduce_bytes_per_step_lora"] / result["allreduce_bytes_per_step_full"]
    assert ratio == pytest.approx(result["trainable_params"] / result["total_params"], rel=1e-12)
    # By hand: r = 4 on q and v, 2 blocks of d = 64: 2 * 2 * 4 * (64 + 64); float64.
    assert result["trainable_params"] == 2 * 2 * 4 * (64 + 64)
    assert result["allreduce_bytes_per_step_lora"] == 8 * result["trainable_params"]
    assert result["allreduce_bytes_per_step_full"] == 8 * result["total_params"]


def test_a_failing_rank_is_named_and_no_rank_survives(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where torch writes its error files
    before = rank_processes()
    with pytest.raises(
        D.RankError, match=r"^rank 1 of 2 failed: RuntimeError: fault injected"
    ) as e:
        D.train_ddp([D.RunConfig(steps=1, fault="raise", fault_rank=1)], nproc=2, timeout=120)
    assert e.value.rank == 1 and "Traceback" in str(e.value)
    assert rank_processes() - before == set()
    assert list(tmp_path.iterdir()) == []  # the failed rank's traceback file is removed too


def test_a_hanging_rank_ends_in_a_timeout_with_a_clear_message_and_no_rank_survives():
    before = rank_processes()
    with pytest.raises(D.DistributedTimeout, match=r"did not finish within timeout=5"):
        D.train_ddp([D.RunConfig(steps=1, fault="hang")], nproc=2, timeout=5)
    assert rank_processes() - before == set()


def test_bad_requests_are_refused_before_any_process_starts(capsys):
    with pytest.raises(ValueError, match="global_batch=15 is not divisible by nproc=2"):
        D.train_ddp([D.RunConfig(global_batch=15)], nproc=2)
    with pytest.raises(ValueError, match="model must be one of"):
        D.RunConfig(model="bert")
    with pytest.raises(ValueError, match="nproc must be a positive integer, got 0"):
        D.train_ddp([D.RunConfig()], nproc=0)
    for kwargs, error, match in [
        ({"nproc": 2.0}, TypeError, "nproc must be a positive integer, got 2.0"),
        ({"timeout": 0}, ValueError, "timeout must be a positive number, got timeout=0"),
        ({"timeout": "5"}, TypeError, "timeout must be a positive number, got timeout='5'"),
        ({"runs": []}, ValueError, "runs is empty"),
        ({"runs": [{"steps": 1}]}, TypeError, "runs must be a sequence of RunConfig"),
    ]:
        with pytest.raises(error, match="^train_ddp: " + match):
            D.train_ddp(**{"runs": [D.RunConfig()], **kwargs})
    assert cli_main(["ddp", "--batch", "7"]) == 2
    assert "global_batch=7 is not divisible by nproc=2" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["ddp", "--device", "cuda"]) == 2
        assert "CUDA is not available here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": "bert"}, ValueError, "model must be one of .*got model='bert'"),
        ({"model": None}, TypeError, "model must be one of .*got model=None"),
        ({"full": 1}, TypeError, "full must be True or False, got 1"),
        ({"r": 0}, ValueError, "r must be a positive integer, got 0"),
        ({"steps": 2.0}, TypeError, "steps must be a positive integer, got 2.0"),
        ({"alpha": float("inf")}, ValueError, "alpha must be a positive number, got alpha=inf"),
        ({"lr": "1e-2"}, TypeError, "lr must be a positive number, got lr='1e-2'"),
        ({"bucket_cap_mb": -1.0}, ValueError, "bucket_cap_mb must be a positive number"),
        ({"seed": -1}, ValueError, "seed must be an integer >= 0, got -1"),
        ({"fault_rank": 1.0}, TypeError, "fault_rank must be an integer >= 0, got 1.0"),
        ({"dtype": "float16"}, ValueError, "dtype must be one of .*got dtype='float16'"),
        ({"fault": "crash"}, ValueError, "fault must be one of .*got fault='crash'"),
        ({"fault": True}, TypeError, "fault must be one of .*got fault=True"),
    ],
)
def test_run_config_wrong_type_or_value(kwargs, error, match):
    """A wrong type is a TypeError, a wrong value a ValueError; both name the field and value."""
    with pytest.raises(error, match="^RunConfig: " + match):
        D.RunConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"world_size": 0}, ValueError, "world_size must be a positive integer, got 0"),
        ({"world_size": 2.0}, TypeError, "world_size must be a positive integer, got 2.0"),
        ({"rank": -1}, ValueError, "rank must be an integer >= 0, got -1"),
        ({"rank": "0"}, TypeError, "rank must be an integer >= 0, got '0'"),
        ({"rank": 2, "world_size": 2}, ValueError, "rank=2 is not below world_size=2"),
        ({"world_size": 3}, ValueError, "global_batch=16 is not divisible by world_size=3"),
    ],
)
def test_train_rank_refuses_a_bad_rank_or_world_size(kwargs, error, match):
    with pytest.raises(error, match="^train_rank: " + match):
        D.train_rank(D.RunConfig(), **kwargs)


def test_params_reports_gradient_communication_per_step(capsys):
    shape = counting.get_preset("gpt3-175b")
    est = counting.memory_estimate(shape, 4, "q,v", dtype="fp16")
    assert cli_main(["params", "--preset", "gpt3-175b", "--r", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Data parallel: each step all-reduces one gradient per trainable parameter, 2 bytes in fp16.
    assert out["allreduce_bytes_per_step_full"] == 2 * shape.num_params()
    assert out["allreduce_bytes_per_step_lora"] == 2 * est.trainable_params == 2 * 18_874_368
    assert cli_main(["params", "--preset", "gpt3-175b", "--r", "4"]) == 0
    text = capsys.readouterr().out
    assert "gradient all-reduce per step" in text


def test_ring_allreduce_sends_twice_the_payload_times_n_minus_one_over_n():
    assert counting.ring_allreduce_bytes(1000, 1) == 0  # alone, nothing to send
    assert counting.ring_allreduce_bytes(1000, 2) == 1000
    assert counting.ring_allreduce_bytes(1000, 8) == 1750
    with pytest.raises(ValueError, match="world_size must be a positive integer, got 0"):
        counting.ring_allreduce_bytes(1000, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_on_gpus_with_nccl_the_same_equivalence_and_bytes():
    nproc = min(2, torch.cuda.device_count())
    run = D.RunConfig(model="gpt", steps=3, global_batch=8)
    [ddp] = D.train_ddp([run], nproc=nproc, device="cuda", timeout=300)
    assert ddp.device == "cuda"
    assert ddp.allreduce_bytes_per_step == D.predicted_allreduce_bytes(D.build_model(run))
    single = D.train_single(run, device="cpu")
    assert ddp.max_param_diff(single.params) < 1e-9  # GPU and CPU float64 differ by round-off
