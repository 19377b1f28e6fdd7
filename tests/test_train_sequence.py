"""The trainer on sequences: the ``sort`` data set, targets and accuracy on the
answer tokens, ``fit`` on a tiny transformer with the live check, ``jbp train
--model transformer`` end to end, and every new error message."""

from __future__ import annotations

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp.cli import main

SEP = 10


@pytest.fixture(scope="module")
def small_sort():
    """64 train and 64 test sequences of 3 digits: whole batches of 16, and one
    shape for every evaluation (fewer programs to compile)."""
    data = jbp.load_dataset("sort", n=160, length=3, seed=1, test_fraction=0.5)
    assert len(data.x_train) >= 64 and len(data.x_test) >= 64
    return data._replace(x_train=data.x_train[:64], y_train=data.y_train[:64],
                         x_test=data.x_test[:64], y_test=data.y_test[:64])  # fmt: skip


def _tiny(length=6, vocab=11):
    return jbp.transformer(vocab, length, 8, 2, 1)


# --- the data set ---------------------------------------------------------------------


def test_sort_has_tokens_labels_per_position_and_answer_positions():
    data = jbp.load_dataset("sort", n=200, length=4, seed=3)
    assert data.is_sequence and not jbp.load_dataset("xor").is_sequence
    assert (data.x_train.shape, data.y_train.shape) == ((160, 8), (160, 8))
    assert (data.x_test.shape, data.y_test.shape) == ((40, 8), (40, 8))
    assert data.x_train.dtype == data.y_train.dtype == np.int32
    assert (data.n_classes, data.input_shape, data.name) == (11, (8,), "sort(n=200, length=4)")
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        digits = x[:, :4]
        assert digits.min() >= 0 and digits.max() <= 9
        assert np.all(x[:, 4] == SEP)  # the separator, then the sorted digits but the last
        np.testing.assert_array_equal(x[:, 5:], np.sort(digits, axis=1)[:, :3])
        # no target where the next token is a random digit (or the separator) ...
        assert np.all(y[:, :4] == -1)
        # ... and the next token, the next sorted digit, at the 4 answer positions
        np.testing.assert_array_equal(y[:, 4:], np.sort(digits, axis=1))
        np.testing.assert_array_equal(y[:, 4:], np.concatenate([x[:, 5:], y[:, -1:]], axis=1))


def test_sort_is_seeded_distinct_and_split_by_multiset():
    a, b = (jbp.load_dataset("sort", n=300, length=3, seed=5) for _ in range(2))
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = jbp.load_dataset("sort", n=300, length=3, seed=6)
    assert not np.array_equal(a.x_train, c.x_train)
    rows = np.concatenate([a.x_train, a.x_test])[:, :3]
    assert len({tuple(r) for r in rows}) == 300  # distinct sequences
    train = {tuple(sorted(r)) for r in a.x_train[:, :3]}
    test = {tuple(sorted(r)) for r in a.x_test[:, :3]}
    assert train and test and not train & test  # no test multiset is seen in training
    assert 60 <= len(a.x_test) < 70  # at least round(0.2 · 300), whole multisets
    # few possible sequences: every one of them, once
    every = jbp.load_dataset("sort", n=100, length=2, test_fraction=0.0)
    assert len(every.x_test) == 0
    assert sorted(10 * r[0] + r[1] for r in every.x_train) == list(range(100))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": 101, "length": 2}, r"`n`=101 sequences of `length`=2 cannot all be distinct: t"),
        ({"n": 0}, r"`n` must be a positive int, got 0"),
        ({"length": 2.5}, r"`length` must be a positive int, got 2.5"),
        ({"n": 2, "length": 1, "test_fraction": 0.9}, r"puts all 2 sequences in the test split"),
        ({"test_fraction": 1.0}, r"`test_fraction` must be in \[0, 1\), got 1.0"),
    ],
)
def test_sort_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        jbp.load_dataset("sort", **options)


# --- targets and accuracy on the answer tokens -----------------------------------------


def _identity_net():
    """Tokens 0..2 to logits ``eye(3)[token]``: each position predicts its own token."""
    net = jbp.Sequential([jbp.Embedding(3, 3)])
    return net, ({"table": jnp.eye(3, dtype=jnp.float64)},)


TOKENS = np.array([[0, 1, 2], [2, 2, 1]])
LABELS = np.array([[-1, 1, 0], [-1, 2, -1]])  # scored: (0,1) right, (0,2) wrong, (1,1) right


def test_targets_keep_labels_minus_one_for_softmax_xent_and_one_hot_otherwise():
    net, _ = _identity_net()
    t = jbp.targets(net, "softmax_xent", LABELS, np.float64)  # the loss takes -1 itself
    assert t.dtype == np.int32
    np.testing.assert_array_equal(t, LABELS)
    full = np.array([[0, 1, 2]])
    assert jbp.targets(net, "softmax_xent", full).dtype == np.int32
    np.testing.assert_array_equal(jbp.targets(net, "mse", full)[0], np.eye(3))


def test_accuracy_and_loss_count_the_answer_tokens_only():
    net, params = _identity_net()
    ev = jbp.evaluate(net, "softmax_xent", params, TOKENS, LABELS)
    lse = math.log(math.e + 2)  # logsumexp of a row (1, 0, 0)
    loss = ((lse - 1 + lse) / 2 + (lse - 1) / 1) / 2  # ℓ_i: mean over its own targets
    assert ev["n"] == 2 and ev["tokens"] == 3
    assert ev["accuracy"] == 2 / 3 and ev["sequence_accuracy"] == 0.5
    np.testing.assert_allclose(ev["loss"], loss, rtol=1e-12)
    # δ = 0 where there is no target: token 0 appears only at an ignored position
    y = jbp.targets(net, "softmax_xent", LABELS, np.float64)
    grads = jbp.backprop(net, "softmax_xent")(params, TOKENS, y)
    assert np.all(np.asarray(grads[0]["table"][0]) == 0.0)
    assert np.all(np.abs(np.asarray(grads[0]["table"][1:])).sum(axis=1) > 0)
    # chunks of 1 example give the same counts
    one = jbp.evaluate(net, "softmax_xent", params, TOKENS, LABELS, batch_size=1)
    np.testing.assert_allclose(one.pop("loss"), ev.pop("loss"), rtol=1e-14)
    assert one == ev


# --- fit and the CLI --------------------------------------------------------------------


def test_fit_trains_a_tiny_transformer_with_the_live_check(small_sort):
    net = _tiny()
    result = jbp.fit(net, "softmax_xent", optax.adam(3e-3), small_sort, epochs=2, batch_size=16,
                     check_every=3)  # fmt: skip
    history = result.history
    assert int(result.state.step) == 8  # 64 sequences, 4 batches an epoch
    assert [r["grad_checks"] for r in history] == [2, 1]  # steps 0, 3 | 6
    assert all(0.0 <= r["grad_check_max_rel_err"] <= 1e-4 for r in history)
    assert history[-1]["train_loss"] < history[0]["batch_loss"]
    # test accuracy: the answer tokens of the held-out sequences, as predicted by the params
    params = result.state.params
    predicted = np.asarray(net.apply(params, small_sort.x_test)).argmax(-1)
    answers = small_sort.y_test >= 0
    want = np.mean(predicted[answers] == small_sort.y_test[answers])
    ev = jbp.evaluate(net, "softmax_xent", params, small_sort.x_test, small_sort.y_test)
    assert ev["accuracy"] == history[-1]["test_accuracy"]
    np.testing.assert_allclose(ev["accuracy"], want, rtol=1e-12)
    assert ev["tokens"] == answers.sum() == 3 * len(small_sort.x_test)


def test_jbp_train_transformer_on_sort_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "transformer", "--data", "sort", "--features", "8", "--heads", "2",
            "--depth", "1", "--test-fraction", "0.95", "--batch-size", "64", "--epochs", "2",
            "--check-every", "2", "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sort(n=5000, length=8): 250 train / 4750 test examples, sequences of 16 tokens" in out
    assert "transformer: 1 block, 8 features, 2 heads" in out and "(cosine)" in out
    assert "backprop: test accuracy " in out and "% of answer tokens (" in out
    assert "/38000), " in out and "after 2 epochs (8 steps)" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_checks"] for r in records] == [2, 2]
    config = json.loads((run / "config.json").read_text())
    assert (config["schedule"], config["features"], config["heads"], config["depth"]) == (
        "cosine", 8, 2, 1
    )  # fmt: skip
    # a cosine schedule decays over the run's epochs: resuming with others is refused
    assert main([*argv[:-2], "--epochs", "3", "--run-dir", str(run), "--resume"]) == 2
    assert "--epochs is 3 but the run being resumed used 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "transformer", "--data", "moons"],
         r"--model transformer needs a sequence data set, integer tokens \(n, T\) with labels "
         r"per position \(n, T\), but moons\(n=1000, noise=0.1\) has examples of shape \(2,\)"),
        (["--data", "sort"],
         r"--model mlp needs feature vectors or images with one label each, but sort\(n=5000, "
         r"length=8\) is a sequence data set .*; use --model transformer"),
        (["--model", "cnn", "--data", "sort"], r"--model cnn needs feature vectors or images"),
        (["--model", "transformer", "--data", "sort", "--heads", "3"],
         r"--model transformer: `features`=64 is not divisible by `heads`=3"),
    ],
)  # fmt: skip
def test_jbp_train_rejects_models_that_do_not_fit_the_data(argv, message, capsys):
    assert main(["train", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


# --- errors -----------------------------------------------------------------------------


def _with(data, **fields):
    return data._replace(**fields)


@pytest.mark.parametrize(
    ("net", "change", "loss", "message"),
    [
        (_tiny(), {"x_train": "float"}, "softmax_xent",
         r"`data.x_train` has dtype float32, but the network's first layer \(Embedding"
         r"\(vocab=11, features=8\)\) takes integer tokens"),
        (_tiny(vocab=8), {}, "softmax_xent",
         r"`data.x_train` has tokens in \[0, 10\] but the first layer has vocab=8, so tokens "
         r"must lie in \[0, 7\]; the first outside is data.x_train\[\d+, \d+\] = (8|9|10)$"),
        (_tiny(), {}, "mse",
         r"`data.y_train` has positions without a target \(label -1\), which only softmax_xent "
         r"can leave out .* use loss 'softmax_xent'"),
        (_tiny(), {"y_train": "minus2"}, "softmax_xent",
         r"`data.y_train` holds label -2; labels per position are classes 0, 1, ... or -1 where "
         r"a position has no target; the first outside is data.y_train\[\d+, \d+\] = -2$"),
        (_tiny(), {"y_train": "none"}, "softmax_xent",
         r"`data.y_train` has no position with a target: every label is -1"),
        (_tiny(), {"y_train": "flat", "y_test": "flat"}, "softmax_xent",
         r"the network maps one example of `data.x_train` to shape \(6, 11\), but a classifier "
         r"needs one score per class, .*; labels per position \(n, T\) would fit"),
        (jbp.mlp([6, 11]), {}, "softmax_xent",
         r"the network maps one example of `data.x_train` to shape \(11,\), but labels per "
         r"position of shape \(6,\) need one score per class at each position, shape "
         r"\(6, classes\); a sequence model such as jbp.transformer gives that"),
        (jbp.Sequential([jbp.Embedding(11, 8), jbp.Dense(8, 5)]), {}, "softmax_xent",
         r"`data.y_train` lie in \[0, 9\] but the network's 5 outputs express classes 0..4; "
         r"give the last layer 10 outputs; the first outside is data.y_train\[\d+, \d+\] = "
         r"[5-9]$"),
        (jbp.Sequential([jbp.Embedding(11, 8), jbp.Dense(8, 1)]), {}, "softmax_xent",
         r"labels per position need at least 2 outputs but the network has 1"),
        (_tiny(length=4), {}, "softmax_xent",
         r"`data.x_train` has examples of shape \(6,\), which the network cannot take: .*"
         r"has a table of 4 positions, but the sequences are 6 long"),
    ],
)  # fmt: skip
def test_fit_rejects_sequence_data_that_does_not_fit(small_sort, net, change, loss, message):
    edits = {
        "float": lambda a: a.astype(np.float32),
        "minus2": lambda a: np.where(a == -1, -2, a),
        "none": lambda a: np.full_like(a, -1),
        "flat": lambda a: a[:, -1],
    }
    data = _with(small_sort, **{k: edits[v](getattr(small_sort, k)) for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        jbp.fit(net, loss, optax.sgd(0.1), data, epochs=1)


def test_evaluate_and_targets_reject_bad_sequence_labels():
    net, params = _identity_net()
    with pytest.raises(
        ValueError,
        match=r"`labels` must be integer class labels of shape \(n,\), or labels per position "
        r"\(n, T\) for sequences, got float64 of shape \(2, 3\)",
    ):
        jbp.evaluate(net, "softmax_xent", params, TOKENS, LABELS.astype(np.float64))
    with pytest.raises(
        ValueError, match=r"`x` has tokens in \[1, 3\] but the first layer has vocab=3"
    ):
        jbp.evaluate(net, "softmax_xent", params, TOKENS + 1, LABELS)
    with pytest.raises(ValueError, match=r"`labels` has positions without a target"):
        jbp.targets(net, "half_sse", LABELS)
