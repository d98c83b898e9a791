"""Tests for loralab.training: the shared classifier training loop."""

import numpy as np
import pytest

from loralab import functional as F
from loralab import optim
from loralab.datasets import Dataset
from loralab.lora import inject_lora
from loralab.nn import MLP
from loralab.training import batch_indices, evaluate, fit, train_classifier


def blobs(n=120, seed=0):
    """Three well separated Gaussian clusters in 4 dimensions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centres = 3.0 * np.eye(3, 4)
    x = (centres[y] + 0.3 * rng.normal(size=(n, 4))).astype(np.float32)
    return Dataset(x, y.astype(np.int64))


def test_training_lowers_the_loss_and_fits_separable_data():
    data = blobs()
    model = MLP([4, 16, 3], seed=0)
    loss_before, _ = evaluate(model, data)
    history = train_classifier(
        model, data, steps=60, lr=1e-2, batch_size=16, eval_data=data, progress=False
    )
    loss_after, acc_after = evaluate(model, data)
    assert loss_after < loss_before / 2
    assert acc_after == 1.0
    assert len(history.loss) == 60
    assert history.eval_step[0] == 0 and history.eval_step[-1] == 60
    assert history.eval_accuracy[-1] == acc_after and history.eval_loss[0] == pytest.approx(
        loss_before
    )
    assert history.seconds > 0 and history.step_time == pytest.approx(history.seconds / 60)
    assert len(history.step_seconds) == 60 and min(history.step_seconds) > 0
    assert history.seconds == pytest.approx(sum(history.step_seconds))


def test_same_seed_same_run_and_other_seed_other_run():
    data = blobs()
    runs = []
    for seed in (0, 0, 1):
        model = MLP([4, 8, 3], seed=0)
        runs.append(
            train_classifier(
                model, data, steps=10, lr=1e-2, batch_size=8, seed=seed, progress=False
            ).loss
        )
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_only_trainable_parameters_change():
    data = blobs()
    model = inject_lora(MLP([4, 8, 3], seed=0), ["0"], r=2, alpha=4, seed=0)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    train_classifier(model, data, steps=5, lr=1e-2, progress=False, optimizer="sgd")
    for name, p in model.named_parameters():
        changed = not np.array_equal(before[name], p.data)
        assert changed == p.requires_grad, name


def test_evaluate_restores_training_mode():
    model = MLP([4, 8, 3], seed=0)
    model.train()
    evaluate(model, blobs(20))
    assert model.training
    model.eval()
    evaluate(model, blobs(20))
    assert not model.training


class RecordingMLP(MLP):
    """An MLP that remembers the rows of every batch it is trained on (by their first feature)."""

    def __init__(self, sizes):
        super().__init__(sizes, seed=0)
        self.seen = []

    def forward(self, x):
        if self.training:
            self.seen.append(np.asarray(x)[:, 0].tolist())
        return super().forward(x)


@pytest.mark.parametrize(("n", "batch_size", "per_epoch"), [(10, 64, 1), (12, 4, 3), (9, 3, 3)])
def test_training_visits_every_row_exactly_once_per_epoch(n, batch_size, per_epoch):
    data = blobs(n)
    data = Dataset(np.column_stack([np.arange(n), data.x[:, 1:]]).astype(np.float32), data.y)
    model = RecordingMLP([4, 8, 3])
    history = train_classifier(
        model, data, steps=3 * per_epoch, lr=1e-2, batch_size=batch_size, progress=False
    )
    assert len(history.loss) == len(model.seen) == 3 * per_epoch
    for epoch in range(3):
        rows = sum(model.seen[epoch * per_epoch : (epoch + 1) * per_epoch], [])
        assert sorted(rows) == list(range(n))  # every row once, none twice, none left out


@pytest.mark.parametrize(
    ("error", "kwargs", "match"),
    [
        (ValueError, {"steps": 0}, "train_classifier: steps must be a positive integer, got 0"),
        (TypeError, {"steps": 2.5}, "train_classifier: steps must be a positive integer, got 2.5"),
        (TypeError, {"steps": True}, "steps must be a positive integer, got True"),
        (ValueError, {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (TypeError, {"batch_size": "64"}, "batch_size must be a positive integer, got '64'"),
        (ValueError, {"eval_every": -1}, "eval_every must be a positive integer, got -1"),
        (ValueError, {"lr": 0.0}, "lr must be a positive number, got lr=0.0"),
        (ValueError, {"lr": float("nan")}, "lr must be a positive number, got lr=nan"),
        (TypeError, {"lr": "1e-2"}, "lr must be a positive number, got lr='1e-2'"),
        (ValueError, {"weight_decay": -0.1}, "weight_decay must be a finite number >= 0"),
        (TypeError, {"weight_decay": None}, "weight_decay must be a finite number >= 0"),
        (ValueError, {"optimizer": "lbfgs"}, "optimizer must be one of .*got optimizer='lbfgs'"),
        (TypeError, {"optimizer": optim.Adam}, "optimizer must be one of"),
    ],
)
def test_bad_options_raise_naming_the_argument(error, kwargs, match):
    """A wrong type is a TypeError, a wrong value a ValueError; the message names both."""
    options = {"steps": 2, "lr": 1e-2, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        train_classifier(MLP([4, 8, 3], seed=0), blobs(), **options)


@pytest.mark.parametrize(
    ("error", "kwargs", "match"),
    [
        (ValueError, {"steps": 0}, "fit: steps must be a positive integer, got 0"),
        (TypeError, {"steps": 3.0}, "fit: steps must be a positive integer, got 3.0"),
        (ValueError, {"eval_every": 0}, "fit: eval_every must be a positive integer, got 0"),
        (TypeError, {"eval_every": None}, "fit: eval_every must be a positive integer, got None"),
    ],
)
def test_fit_refuses_bad_counts(error, kwargs, match):
    model = MLP([4, 3], seed=0)
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    with pytest.raises(error, match=match):
        fit(lambda b: model(b).sum(), [np.zeros((1, 4))] * 3, opt, **{"steps": 1, **kwargs})


@pytest.mark.parametrize(
    ("error", "kwargs", "match"),
    [
        (ValueError, {"n": 0}, "batch_indices: n must be a positive integer, got 0"),
        (TypeError, {"n": 5.0}, "batch_indices: n must be a positive integer, got 5.0"),
        (ValueError, {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        (ValueError, {"steps": -1}, "batch_indices: steps must be an integer >= 0, got -1"),
        (TypeError, {"steps": "3"}, "batch_indices: steps must be an integer >= 0, got '3'"),
    ],
)
def test_batch_indices_refuses_bad_arguments_when_called(error, kwargs, match):
    """Checked at the call, not at the first ``next()`` (it is a generator underneath)."""
    with pytest.raises(error, match=match):
        batch_indices(**{"n": 5, "batch_size": 2, "steps": 3, **kwargs})


def test_a_fully_frozen_model_is_refused():
    model = MLP([4, 8, 3], seed=0).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        train_classifier(model, blobs(), steps=1, lr=1e-2, progress=False)


def test_mismatched_data_is_refused():
    data = blobs()
    with pytest.raises(ValueError, match="rows"):
        train_classifier(
            MLP([4, 8, 3], seed=0), Dataset(data.x, data.y[:-1]), steps=1, lr=1e-2, progress=False
        )


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (12, 4), (5, 8)])
def test_batch_indices_cover_each_epoch_without_replacement(n, batch_size):
    per_epoch = max(n // batch_size, 1)
    batches = list(batch_indices(n, batch_size=batch_size, steps=3 * per_epoch, seed=1))
    assert all(len(b) == min(batch_size, n) for b in batches)
    for epoch in range(3):
        rows = np.concatenate(batches[epoch * per_epoch : (epoch + 1) * per_epoch])
        assert len(set(rows.tolist())) == len(rows)  # no row twice in an epoch
    again = list(batch_indices(n, batch_size=batch_size, steps=3 * per_epoch, seed=1))
    other = list(batch_indices(n, batch_size=batch_size, steps=3 * per_epoch, seed=2))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other, strict=True))


def test_train_classifier_steps_through_batch_indices():
    """The loop is plain Adam on the batches of `batch_indices`: replaying it by hand matches."""
    data = blobs()
    model, by_hand = MLP([4, 8, 3], seed=0), MLP([4, 8, 3], seed=0)
    history = train_classifier(
        model, data, steps=12, lr=1e-2, batch_size=16, seed=5, progress=False
    )
    opt = optim.Adam(list(by_hand.parameters()), lr=1e-2)
    losses = []
    for idx in batch_indices(len(data), batch_size=16, steps=12, seed=5):
        loss = F.cross_entropy(by_hand(data.x[idx]), data.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    assert history.loss == losses
    for (name, p), q in zip(model.named_parameters(), by_hand.parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)


def test_progress_bar_shows_running_loss_and_eval_accuracy(capsys):
    pytest.importorskip("tqdm")
    data = blobs()
    history = train_classifier(
        MLP([4, 8, 3], seed=0),
        data,
        steps=20,
        lr=1e-2,
        eval_data=data,
        eval_every=10,
        desc="blobs-run",
        leave=True,
    )
    err = capsys.readouterr().err
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert "blobs-run" in final and "20/20" in final
    assert f"loss {np.mean(history.loss[-10:]):.3g}" in final
    assert f"eval accuracy {history.eval_accuracy[-1]:.1%}" in final


def test_no_progress_bar_writes_nothing(capsys):
    train_classifier(MLP([4, 8, 3], seed=0), blobs(), steps=3, lr=1e-2, progress=False)
    assert capsys.readouterr().err == ""


def test_fit_scales_the_learning_rate_and_refuses_too_few_batches():
    data, model = blobs(), MLP([4, 8, 3], seed=0)
    opt = optim.SGD(list(model.parameters()), lr=0.1)
    lrs = []

    def loss_fn(idx):
        lrs.append(opt.param_groups[0]["lr"])
        return F.cross_entropy(model(data.x[idx]), data.y[idx])

    batches = batch_indices(len(data), batch_size=8, steps=3)
    history = fit(loss_fn, batches, opt, steps=3, lr_schedule=lambda i: 1.0 / (i + 1))
    assert lrs == pytest.approx([0.1, 0.05, 0.1 / 3]) and len(history.loss) == 3
    with pytest.raises(ValueError, match="batches ran out after 2 of 3 steps"):
        fit(loss_fn, [np.arange(4)] * 2, opt, steps=3)


def test_training_a_merged_model_says_it_is_merged():
    """A merged LoRA layer computes with the frozen W0 + ΔW, so A and B would get no gradient."""
    from loralab.lora import merge_lora, unmerge_lora

    data = blobs(n=16)
    model = MLP([4, 8, 3], seed=0)
    inject_lora(model, ["0", "2"], r=2, alpha=4, seed=0)
    merge_lora(model)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"train_classifier: the model's LoRA layers \['0', '2'\] are merged.*unmerge_lora",
    ):
        train_classifier(model, data, steps=1, lr=0.1, progress=False)
    # fit sees only a loss function: it says what is wrong and names merging as a cause.
    trainable = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(
        RuntimeError, match=r"train_step: the loss does not depend on.*unmerge_lora"
    ):
        fit(
            lambda _: F.cross_entropy(model(data.x), data.y),
            [0],
            optim.SGD(trainable, lr=0.1),
            steps=1,
        )
    assert all(np.array_equal(p.data, before[n]) for n, p in model.named_parameters())
    unmerge_lora(model)
    train_classifier(model, data, steps=1, lr=0.1, progress=False)
