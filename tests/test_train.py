"""The trainer: the step with both gradient sources, fit, the live gradient check,
NaN detection, early stopping, checkpoints (atomic, corrupt, mismatched), exact
resume, plots and the ``jbp train`` command."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import jbp
from jbp import _checkpoint
from jbp.cli import main

LOSSES = ("softmax_xent", "half_sse", "mse", "sigmoid_bce")


@pytest.fixture(scope="module")
def moons():
    return jbp.load_dataset("moons", n=96, seed=0, test_fraction=0.25)


def _net(hidden=8, out=2):
    return jbp.mlp([2, hidden, out], "tanh")


def _assert_trees_equal(a, b):
    """Bitwise: same structure, and every leaf the same dtype, shape and bytes."""
    la, ta = jtu.tree_flatten(a)
    lb, tb = jtu.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), (x, y)


def _max_abs_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True))  # fmt: skip


# --- the step -------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("source", ["backprop", "autodiff"])
def test_step_is_an_sgd_update_on_the_reference_gradient(loss, source):
    net = _net(out=3)
    opt = optax.sgd(0.1)
    state = jbp.init_state(net, opt, jax.random.key(1), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64)
    labels = np.array([0, 1, 2, 1, 0])
    y = jbp.targets(net, loss, labels, jnp.float64)
    new, metrics = jbp.make_step(net, loss, opt, gradient_source=source, jit=False)(state, x, y)
    f = jbp.objective(net, loss)
    value, grad = jax.device_get(jax.jit(jax.value_and_grad(f))(state.params, x, y))  # reference
    want = jtu.tree_map(lambda p, g: np.asarray(p) - 0.1 * g, state.params, grad)
    assert _max_abs_diff(new.params, want) < 1e-13
    np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-14)
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in jtu.tree_leaves(grad)))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-12)
    assert int(new.step) == 1 and int(state.step) == 0
    assert not np.array_equal(jax.random.key_data(new.key), jax.random.key_data(state.key))


def test_step_is_pure_and_jit_agrees_with_eager():
    net, opt = _net(), optax.sgd(0.1, momentum=0.9)
    state = jbp.init_state(net, opt, jax.random.key(0), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (6, 2), jnp.float64)
    y = jnp.array([0, 1, 1, 0, 1, 0])
    jitted = jbp.make_step(net, "softmax_xent", opt)
    a, _ = jitted(state, x, y)
    b, _ = jitted(state, x, y)
    _assert_trees_equal(a, b)  # same input state, same output: nothing hidden
    eager, _ = jbp.make_step(net, "softmax_xent", opt, jit=False)(state, x, y)
    assert _max_abs_diff(a.params, eager.params) < 1e-14
    assert isinstance(a, jbp.TrainState) and a._fields == ("params", "opt_state", "step", "key")


def test_the_two_sources_train_to_the_same_parameters(moons):
    """Same seed, same optimiser: the runs end equal to 1e-12 in float64 and 1e-5 in float32."""
    net = _net()
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        runs = {
            source: jbp.fit(net, "softmax_xent", optax.adam(0.05), moons, epochs=3,
                            batch_size=24, seed=2, dtype=dtype, gradient_source=source)
            for source in ("backprop", "autodiff")
        }  # fmt: skip
        a, b = runs["backprop"], runs["autodiff"]
        assert int(a.state.step) == int(b.state.step) == 9
        moved = _max_abs_diff(a.state.params, jbp.init_state(net, optax.adam(0.05),
                              jax.random.key(2), dtype=dtype).params)  # fmt: skip
        assert moved > 0.05  # training changed the params ...
        assert _max_abs_diff(a.state.params, b.state.params) <= tol  # ... identically
        for ra, rb in zip(a.history, b.history, strict=True):
            np.testing.assert_allclose(ra["train_loss"], rb["train_loss"], rtol=100 * tol)


def test_fit_learns_moons(moons):
    result = jbp.fit(_net(16), "softmax_xent", optax.adam(0.05), moons, epochs=15, batch_size=12)
    assert result.stop_reason == "epochs" and len(result.history) == 15
    assert [r["epoch"] for r in result.history] == list(range(1, 16))
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert result.history[-1]["test_accuracy"] >= 0.85
    # the recorded accuracy is what the final params give, computed independently
    out = np.asarray(_net(16).apply(result.state.params, moons.x_test))
    assert result.history[-1]["test_accuracy"] == np.mean(out.argmax(axis=1) == moons.y_test)


def test_evaluate_is_the_mean_loss_and_accuracy(moons):
    net = _net()
    params = net.init(jax.random.key(0))
    ev = jbp.evaluate(net, "softmax_xent", params, moons.x_test, moons.y_test, batch_size=7)
    want = float(jbp.objective(net, "softmax_xent")(params, moons.x_test, moons.y_test))
    np.testing.assert_allclose(ev["loss"], want, rtol=1e-5)
    out = np.asarray(net.apply(params, moons.x_test))
    assert ev["accuracy"] == np.mean(out.argmax(axis=1) == moons.y_test)
    assert ev["n"] == len(moons.y_test)
    # half_sse is summed over a batch; evaluate still reports the mean per example
    ev = jbp.evaluate(net, "half_sse", params, moons.x_test, moons.y_test)
    y = np.eye(2, dtype=np.float32)[moons.y_test]
    want = float(jbp.objective(net, "half_sse")(params, moons.x_test, y)) / len(y)
    np.testing.assert_allclose(ev["loss"], want, rtol=1e-5)


def test_targets_follow_the_loss_and_outputs():
    labels = np.array([0, 2, 1])
    np.testing.assert_array_equal(jbp.targets(_net(out=3), "softmax_xent", labels), labels)
    one_hot = jbp.targets(_net(out=3), "half_sse", labels, np.float64)
    np.testing.assert_array_equal(one_hot, [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    assert one_hot.dtype == np.float64
    column = jbp.targets(_net(out=1), "sigmoid_bce", np.array([0, 1, 1]))
    np.testing.assert_array_equal(column, [[0], [1], [1]])


def test_binary_single_output_network_trains():
    data = jbp.load_dataset("moons", n=80, seed=1)
    result = jbp.fit(_net(out=1), "sigmoid_bce", optax.adam(0.05), data, epochs=8, batch_size=16)
    assert result.history[-1]["train_accuracy"] >= 0.8


# --- bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"optimizer": "adam"}, TypeError, "`optimizer` must be an optax.GradientTransformation"),
        (
            {"gradient_source": "numeric"},
            ValueError,
            "`gradient_source` must be one of 'backprop', 'autodiff', got 'numeric'",
        ),
        ({"epochs": 0}, ValueError, "`epochs` must be a positive int, got 0"),
        ({"seed": -1}, ValueError, "`seed` must be a non-negative int, got -1"),
        ({"batch_size": 2.5}, ValueError, "`batch_size` must be a positive int, got 2.5"),
        ({"check_every": 0}, ValueError, "`check_every` must be a positive int or None, got 0"),
        ({"patience": -1}, ValueError, "`patience` must be a positive int or None, got -1"),
        (
            {"monitor": "accuracy"},
            ValueError,
            "`monitor` must be 'train_loss' or 'test_loss', got 'accuracy'",
        ),
        ({"dtype": jnp.int32}, TypeError, "`dtype` must be a floating dtype"),
        ({"data": (1, 2)}, TypeError, "`data` must be a jbp.Dataset"),
        (
            {"net": jbp.mlp([3, 4, 2])},
            ValueError,
            r"`data.x_train` has 2 features but the first layer expects fan_in=3",
        ),
        (
            {"net": _net(out=1), "loss": "softmax_xent"},
            ValueError,
            "loss 'softmax_xent' needs at least 2 outputs but the network has 1",
        ),
        ({"resume": True}, ValueError, r"`resume=True` needs the `run_dir` of the run to continue"),
    ],
)
def test_fit_rejects_bad_arguments(moons, kwargs, error, message):
    args = {"net": _net(), "loss": "softmax_xent", "optimizer": optax.sgd(0.1), "data": moons}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        jbp.fit(args.pop("net"), args.pop("loss"), args.pop("optimizer"), args.pop("data"), **args)


def test_fit_rejects_labels_the_outputs_cannot_express():
    data = jbp.load_dataset("spirals", n=30, classes=3)
    with pytest.raises(
        ValueError,
        match=r"`data.y_train` lie in \[0, 2\] but the network's 2 outputs express classes 0..1; give the last layer 3 outputs",
    ):
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data)
    with pytest.raises(ValueError, match="`monitor='test_loss'` but `data` has no test split"):
        no_test = jbp.load_dataset("spirals", n=30, classes=2, test_fraction=0.0)
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), no_test, monitor="test_loss")


def test_step_and_state_reject_bad_arguments():
    with pytest.raises(TypeError, match=r"`optimizer` must be an optax.GradientTransformation"):
        jbp.make_step(_net(), "mse", optax.sgd)
    with pytest.raises(ValueError, match="`gradient_source` must be one of"):
        jbp.make_step(_net(), "mse", optax.sgd(0.1), gradient_source="jax")
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key"):
        jbp.init_state(_net(), optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match=r"`labels` must be integer class labels of shape \(n,\)"):
        jbp.targets(_net(), "mse", np.array([0.0, 1.0]))


# --- live gradient check and NaN ---------------------------------------------------


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class _Scale(jbp.Layer):
    """out = a * s with a deliberately wrong δ: it forgets the factor s."""

    features: int

    def init(self, key, dtype=jnp.float32):
        return {"s": jnp.full((self.features,), 2.0, dtype)}

    def forward(self, params, a):
        return a * params["s"][None, :], a

    def backward(self, params, cache, delta_out):
        return {"s": jnp.sum(delta_out * cache, axis=0)}, delta_out  # bug: no * s


def test_live_check_runs_before_the_donating_step_and_an_epoch_uploads_nothing(
    moons, tmp_path, monkeypatch
):
    """The live check reads the params before the step that donates them (every
    buffer of the carry a step is given is deleted after it), and its figures are
    still those of agreeing gradients, at matmul precision "highest". Once set up, a
    run uploads nothing to the device: the whole of ``train`` (batches, checks, the
    reads, evaluation, checkpoints, kept params) runs under
    ``jax.transfer_guard_host_to_device("disallow_explicit")``: no implicit upload,
    nor a ``jax.device_put``."""
    from jbp._train_loop import _Loop

    train, take = _Loop.train, _Loop._take_step
    donated = []

    def train_without_uploads(self):
        with jax.transfer_guard_host_to_device("disallow_explicit"):
            for upload in (lambda a: jnp.asarray(a) + 0, jax.device_put):  # the guard is on
                with pytest.raises(Exception, match=r"Disallowed .*host-to-device"):
                    upload(np.ones(3, np.float32))
            return train(self)

    def watched(self, k):
        before = jtu.tree_leaves(self.carry)
        take(self, k)
        donated.append(all(leaf.is_deleted() for leaf in before))
        assert not any(leaf.is_deleted() for leaf in jtu.tree_leaves(self.carry))

    monkeypatch.setattr(_Loop, "train", train_without_uploads)
    monkeypatch.setattr(_Loop, "_take_step", watched)
    result = jbp.fit(_net(), "softmax_xent", optax.adam(0.01), moons, epochs=2, batch_size=24,
                     check_every=2, run_dir=tmp_path, checkpoint_every=2, keep_every=5)  # fmt: skip
    assert donated == [True] * 6  # 3 steps an epoch
    # checked at steps 0 and 2, then 4
    assert [r["grad_checks"] for r in result.history] == [2, 1]
    for record in result.history:
        assert 0.0 <= record["grad_check_max_rel_err"] <= 1e-4  # float32 tolerance
        assert record["grad_check_precision"] == "highest"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["grad_checks"] for line in lines] == [2, 1]
    assert (tmp_path / "params" / "step_00000005.npz").exists()
    monkeypatch.undo()
    off = jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, epochs=1, batch_size=24)
    record = off.history[0]
    assert record["grad_checks"] == 0 and record["grad_check_max_rel_err"] is None
    assert record["grad_check_precision"] is None


def test_the_live_checks_figures_on_the_device_are_compares_measure():
    """check_figures reduces two gradient trees on the device to per-leaf figures;
    their report has jbp.compare's rows (paths, errors, scales, bitwise, verdicts,
    notes) for leaves that agree bitwise, differ a little or a lot, are zero to
    round-off (measured against the largest leaf), or hold a NaN on either side."""
    from jbp._train_loop import check_figures, figures_report

    rng = np.random.default_rng(0)
    b = (
        {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)},
        {
            "w": rng.normal(size=(4, 2)).astype(np.float32),
            "b": rng.normal(size=2).astype(np.float32),
        },
        {"s": np.ones(5, np.float32)},
    )
    a = jax.tree.map(np.copy, b)
    a[0]["b"][:] = 1e-9  # zero to round-off against the largest leaf: passes
    a[1]["w"] *= np.float32(1 + 3e-6)  # a little
    a[1]["b"] += 1.0  # a lot
    a[2]["s"][1] = np.nan
    want = jbp.compare(a, b, names=("manual (jbp.backprop)", "autodiff (jax.grad)"))
    figures = jax.device_get(jax.jit(check_figures, static_argnums=2)(a, b, 1e-4))
    assert bool(figures["all_ok"]) is False
    got = figures_report(figures, b, 1e-4, "float32", ())
    assert (got.ok, got.precision, got.first_mismatch.path) == (False, "highest", "params[1]['b']")
    for g, w in zip(got.rows, want.rows, strict=True):
        assert (g.path, g.layer, g.shape, g.bitwise, g.ok, g.note) == (
            w.path, w.layer, w.shape, w.bitwise, w.ok, w.note
        )  # fmt: skip
        np.testing.assert_allclose([g.max_abs_err, g.scale, g.rel_err],
                                   [w.max_abs_err, w.scale, w.rel_err], rtol=1e-6)  # fmt: skip
    assert [r.ok for r in got.rows] == [True, True, False, True, False]  # b before w
    c = jax.tree.map(np.copy, b)
    c[2]["s"][0] = np.inf  # the reference alone not finite: the note names that side
    figures = jax.device_get(jax.jit(check_figures, static_argnums=2)(b, c, 1e-4))
    assert figures_report(figures, b, 1e-4, "float32", ()).rows[-1].note == (
        "non-finite values in autodiff (jax.grad)"
    )


def test_live_check_stops_a_run_whose_backprop_is_wrong(moons):
    net = jbp.Sequential([jbp.Dense(2, 4, "tanh"), _Scale(4), jbp.Dense(4, 2)])
    with pytest.raises(
        jbp.TrainingError,
        match=r"(?s)gradient check failed at step 0: jbp.backprop and jax.grad disagree on the current batch.*first mismatch: params\[0\]",
    ):
        jbp.fit(net, "softmax_xent", optax.sgd(0.1), moons, epochs=2, batch_size=24, check_every=3)


def test_live_check_error_carries_the_report_and_the_last_good_state(moons):
    net = jbp.Sequential([jbp.Dense(2, 4, "tanh"), _Scale(4), jbp.Dense(4, 2)])
    with pytest.raises(jbp.TrainingError) as info:
        jbp.fit(net, "softmax_xent", optax.sgd(0.1), moons, batch_size=24, check_every=1)
    err = info.value
    assert err.step == 0 and int(err.state.step) == 0
    assert isinstance(err.report, jbp.Report) and not err.report.ok
    assert err.report.first_mismatch.layer == 0
    assert "manual (jbp.backprop)" in str(err) and "autodiff (jax.grad)" in str(err)


def _with_nan(data, batch_size, at_step):
    """``data`` with a NaN in the first example of the batch of step ``at_step``
    (in epoch 0, seed 0), found from the public batch order."""
    index = np.arange(len(data.y_train))
    order = [i for _, i in jbp.batches(data.x_train, index, batch_size, seed=0, epoch=0)]
    x = data.x_train.copy()
    x[order[at_step][0], 0] = np.nan
    return data._replace(x_train=x)


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(moons, tmp_path):
    data = _with_nan(moons, 8, at_step=5)
    with pytest.raises(
        jbp.TrainingError,
        match=r"non-finite loss, gradients and parameters at step 5 \(loss nan, gradient norm nan",
    ):
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data, epochs=3, batch_size=8,
                run_dir=tmp_path, checkpoint_every=2)  # fmt: skip
    # the checkpoint on disk is the last one written before the NaN: step 4
    state, _ = jbp.load_checkpoint(tmp_path / "checkpoint.npz",
                                   jbp.init_state(_net(), optax.sgd(0.1), jax.random.key(0)), _net())  # fmt: skip
    assert int(state.step) == 4
    assert all(np.all(np.isfinite(leaf)) for leaf in jtu.tree_leaves(state.params))


def test_a_nan_error_names_the_checkpoint_and_returns_the_good_state(moons, tmp_path):
    data = _with_nan(moons, 8, at_step=3)
    with pytest.raises(jbp.TrainingError) as info:
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data, epochs=3, batch_size=8,
                run_dir=tmp_path, checkpoint_every=1)  # fmt: skip
    err = info.value
    assert err.step == 3 and int(err.state.step) == 3 and err.report is None
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.npz'} (step 3)" in str(err)
    saved, _ = jbp.load_checkpoint(tmp_path / "checkpoint.npz", err.state, _net())
    _assert_trees_equal(saved, err.state)
    # no run folder: the error still hands back the last good state
    with pytest.raises(jbp.TrainingError, match="step 3") as info:
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data, epochs=3, batch_size=8)
    _assert_trees_equal(info.value.state, err.state)


def test_divergence_stops_the_run(moons):
    with pytest.raises(
        jbp.TrainingError,
        match=r"non-finite .* at step \d+ .*training stopped without applying this update",
    ):
        jbp.fit(
            jbp.mlp([2, 32, 32, 2], "relu"),
            "half_sse",
            optax.sgd(1e15),
            moons,
            epochs=5,
            batch_size=24,
        )


def test_a_nan_read_late_names_the_first_bad_step_and_its_state(moons):
    """18 steps an epoch and no check or checkpoint: the host reads only at the
    epoch's end, 15 steps after the NaN, and still names step 2 and hands back
    bitwise the state before it."""
    data = _with_nan(moons, 4, at_step=2)
    with pytest.raises(jbp.TrainingError, match=r"non-finite loss.* at step 2 \(loss nan") as info:
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data, epochs=2, batch_size=4)
    assert info.value.step == 2 and int(info.value.state.step) == 2
    good = jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), data, epochs=2, batch_size=4,
                   max_steps=2)  # fmt: skip
    _assert_trees_equal(info.value.state, good.state)


def test_the_guarded_step_freezes_the_state_at_the_first_bad_step():
    """A non-finite step, or a finite one whose live check failed (``ok`` False), is
    not applied, nor is any later one; the marker keeps its number and figures, and
    only good steps add to the epoch's sums, all on the device."""
    from jbp._losses import get_loss
    from jbp._train_loop import guarded_step, new_carry

    net, opt = _net(), optax.sgd(0.1)
    step = jbp.make_step(net, "softmax_xent", opt, jit=False)
    step = jax.jit(guarded_step(step, get_loss("softmax_xent")))
    state = jbp.init_state(net, opt, jax.random.key(0))
    yes, no = jnp.asarray(True), jnp.asarray(False)
    x, y = np.ones((3, 2), np.float32), np.array([0, 1, 1])
    carry, metrics = step(jax.device_put(new_carry(state)), yes, x, y)
    assert int(carry.bad_step) == -1 and int(carry.state.step) == 1
    assert bool(metrics["applied"])
    assert all(isinstance(v, jax.Array) for v in metrics.values())  # nothing read on the host
    assert (int(carry.sums.steps), int(carry.sums.examples)) == (1, 3)
    np.testing.assert_allclose(float(carry.sums.loss_sum), 3 * float(metrics["loss"]), rtol=1e-6)
    good, sums = carry.state, carry.sums
    carry, metrics = step(carry, yes, np.full((3, 2), np.nan, np.float32), y)
    assert int(carry.bad_step) == 1 and not bool(carry.failed_check)
    assert np.isnan(np.asarray(carry.bad_metrics)).all()  # loss, gradient and parameter norms
    _assert_trees_equal(carry.state, good)  # the update was dropped
    carry, metrics = step(carry, yes, x, y)  # a finite batch later changes nothing
    assert int(carry.bad_step) == 1 and np.isfinite(float(metrics["loss"]))
    _assert_trees_equal(carry.state, good)
    _assert_trees_equal(carry.sums, sums)
    # a failed live check stops it the same way, its metrics finite
    checked, _ = step(jax.device_put(new_carry(good)), no, x, y)
    assert int(checked.bad_step) == 1 and bool(checked.failed_check)
    assert np.isfinite(np.asarray(checked.bad_metrics)).all()
    _assert_trees_equal(checked.state, good)


def test_fit_reads_the_device_at_epoch_ends_not_every_step(moons, monkeypatch):
    """Every host read of a device array goes through ``ArrayImpl._value`` (float,
    int, np.asarray, device_get). Count the steps dispatched when each read happens:
    a loop that waits for every step reads after steps 1, 2, 3, ..."""
    from jbp._train_loop import _Loop

    array_type = type(jnp.zeros(()))
    value, take = array_type._value, _Loop._take_step
    taken, reads = [0], []

    def read(self):
        reads.append(taken[0])
        return value.fget(self)

    def counted(self, k):
        take(self, k)
        taken[0] += 1

    monkeypatch.setattr(array_type, "_value", property(read))
    monkeypatch.setattr(_Loop, "_take_step", counted)
    float(jnp.ones(()) + 1)  # the counter sees a read (else this test could not fail)
    assert reads == [0]
    result = jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, epochs=2, batch_size=4)
    assert int(result.state.step) == 36 == taken[0]  # 18 steps an epoch
    assert sorted(set(reads)) == [0, 18, 36]  # only at the epoch ends (the evaluation too)


# --- early stopping and max_steps -----------------------------------------------------


def test_early_stopping_on_a_plateau(moons):
    result = jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, epochs=10, batch_size=24,
                     patience=2, min_delta=1e9)  # fmt: skip
    # epoch 1 sets the best; epochs 2 and 3 cannot beat it by 1e9
    assert result.stop_reason == "early_stopping" and len(result.history) == 3
    plain = jbp.fit(
        _net(), "softmax_xent", optax.sgd(0.1), moons, epochs=4, batch_size=24, patience=2
    )
    assert plain.stop_reason == "epochs" and len(plain.history) == 4  # still improving


def test_max_steps_stops_mid_epoch(moons):
    result = jbp.fit(
        _net(), "softmax_xent", optax.sgd(0.1), moons, epochs=5, batch_size=24, max_steps=4
    )
    assert result.stop_reason == "max_steps" and int(result.state.step) == 4
    assert len(result.history) == 1  # 3 steps an epoch: one epoch completed


# --- resume ------------------------------------------------------------------------------


_RESUME = {"epochs": 4, "batch_size": 24, "seed": 5, "check_every": 5, "patience": 3}


@pytest.fixture(scope="module")
def uninterrupted(moons):
    return jbp.fit(_net(), "softmax_xent", optax.adam(0.01), moons, **_RESUME)


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch, and at an epoch's end (3 steps each)
def test_resume_is_bitwise_exact(moons, tmp_path, uninterrupted, stop_at):
    net, whole = _net(), uninterrupted
    part = jbp.fit(net, "softmax_xent", optax.adam(0.01), moons, run_dir=tmp_path,
                   max_steps=stop_at, **_RESUME)  # fmt: skip
    assert int(part.state.step) == stop_at
    resumed = jbp.fit(net, "softmax_xent", optax.adam(0.01), moons, run_dir=tmp_path,
                      resume=True, **_RESUME)  # fmt: skip
    assert int(resumed.state.step) == int(whole.state.step) == 12
    _assert_trees_equal(resumed.state, whole.state)  # params, optimiser state, step and key
    timing = ("step_time", "epoch_time")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in whole.history]
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == strip
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in on_disk] == [1, 2, 3, 4]


def test_resume_drops_metrics_written_after_its_checkpoint(moons, tmp_path):
    kw = {"epochs": 2, "batch_size": 24}
    jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, run_dir=tmp_path, max_steps=4, **kw)
    # a crash after writing a record but before the checkpoint: a record past it, torn line
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 6}) + "\n" + '{"epoch": 3, "st')
    result = jbp.fit(
        _net(), "softmax_xent", optax.sgd(0.1), moons, run_dir=tmp_path, resume=True, **kw
    )
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk] == [3, 6] and "train_loss" in on_disk[1]
    assert [r["step"] for r in result.history] == [3, 6]


def test_resume_refuses_other_data_or_a_missing_checkpoint(moons, tmp_path):
    jbp.fit(
        _net(), "softmax_xent", optax.sgd(0.1), moons, epochs=1, batch_size=24, run_dir=tmp_path
    )
    with pytest.raises(
        ValueError,
        match=r"cannot resume .*checkpoint.npz: it was written for data .*'batch_size': 24.* but this run has .*'batch_size': 12",
    ):
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, epochs=2, batch_size=12,
                run_dir=tmp_path, resume=True)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"already holds a run \(checkpoint.npz\); pass resume=True"
    ):
        jbp.fit(_net(), "softmax_xent", optax.sgd(0.1), moons, epochs=1, run_dir=tmp_path)
    with pytest.raises(jbp.CheckpointError, match=r"empty holds no checkpoint.npz to resume"):
        jbp.fit(
            _net(), "softmax_xent", optax.sgd(0.1), moons, run_dir=tmp_path / "empty", resume=True
        )


# --- checkpoints ------------------------------------------------------------------------


def _state(net=None, opt=None, dtype=jnp.float32):
    return jbp.init_state(net or _net(), opt or optax.adam(1e-3), jax.random.key(3), dtype=dtype)


def test_checkpoint_round_trip_is_bitwise(tmp_path):
    state = _state()
    state = state._replace(step=jnp.asarray(7, jnp.int32))
    path = tmp_path / "ck.npz"
    jbp.save_checkpoint(path, state, _net(), extra={"note": "hello", "n": [1, 2]})
    loaded, extra = jbp.load_checkpoint(path, _state(), _net())
    _assert_trees_equal(loaded, state)
    assert extra == {"note": "hello", "n": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600


def test_checkpoint_write_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    good = _state()
    jbp.save_checkpoint(path, good, _net())
    before = path.read_bytes()

    def crash(f, arrays):  # half an archive reaches the disk, then the writer dies
        f.write(before[: len(before) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(_checkpoint, "_write", crash)
    with pytest.raises(OSError, match="disk full"):
        jbp.save_checkpoint(path, good._replace(step=jnp.asarray(9, jnp.int32)), _net())
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]  # no temporary file left behind
    loaded, _ = jbp.load_checkpoint(path, good, _net())
    assert int(loaded.step) == 0


def test_checkpoint_write_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    jbp.save_checkpoint(path, _state(), _net())
    before = path.read_bytes()

    def no_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(_checkpoint.os, "replace", no_replace)
    with pytest.raises(OSError, match="rename failed"):
        jbp.save_checkpoint(path, _state()._replace(step=jnp.asarray(9, jnp.int32)), _net())
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]


def test_a_process_killed_mid_save_leaves_the_old_checkpoint(tmp_path):
    """A hard crash (os._exit, no cleanup) half way through writing the new file."""
    path = tmp_path / "ck.npz"
    jbp.save_checkpoint(path, _state(), _net())
    before = path.read_bytes()
    script = f"""
import os, jax, jax.numpy as jnp, optax, jbp
from jbp import _checkpoint
def die(f, arrays):
    f.write(b"PK" + b"x" * 1000)
    f.flush()
    os._exit(3)
_checkpoint._write = die
net = jbp.mlp([2, 8, 2], "tanh")
state = jbp.init_state(net, optax.adam(1e-3), jax.random.key(3))
jbp.save_checkpoint({str(path)!r}, state._replace(step=jnp.asarray(5, jnp.int32)), net)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stderr
    assert path.read_bytes() == before
    leftovers = [n for n in os.listdir(tmp_path) if n != "ck.npz"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")  # the torn temp file, never read
    loaded, _ = jbp.load_checkpoint(path, _state(), _net())
    assert int(loaded.step) == 0


def _corrupt_leaf(path):
    """Flip bytes inside the first array's data without breaking the zip."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    data = bytearray(members["leaf_0.npy"])
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    members["leaf_0.npy"] = bytes(data)
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)


def _edit_meta(path, **changes):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta.update(changes)
    arrays["__meta__"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
            r"is corrupt or not a jbp checkpoint: BadZipFile",
        ),
        (lambda p: p.write_bytes(b""), r"is corrupt or not a jbp checkpoint"),
        (lambda p: p.write_text("hello"), r"is corrupt or not a jbp checkpoint: ValueError"),
        (
            _corrupt_leaf,
            r"is corrupt or not a jbp checkpoint: its arrays do not match their checksum",
        ),
        (
            lambda p: np.savez(p, a=np.ones(3)),
            r"is corrupt or not a jbp checkpoint: no '__meta__' entry \(the file has \['a'\]\)",
        ),
        (
            lambda p: _edit_meta(p, format="something-else"),
            r"its format is 'something-else', not 'jbp-checkpoint'",
        ),
        (lambda p: _edit_meta(p, version=99), r"has format version 99; this jbp reads version 1"),
        (
            lambda p: _edit_meta(p, leaves=[{}] * 99),
            r"is corrupt or not a jbp checkpoint: missing arrays \['leaf_",
        ),
    ],
)
def test_corrupt_checkpoints_are_refused(tmp_path, damage, message):
    path = tmp_path / "ck.npz"
    jbp.save_checkpoint(path, _state(), _net())
    damage(path)
    with pytest.raises(jbp.CheckpointError, match=message):
        jbp.load_checkpoint(path, _state(), _net())


def test_a_single_array_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(jbp.CheckpointError, match=r"it holds a single array, not an .npz archive"):
        jbp.load_checkpoint(path, _state(), _net())
    with pytest.raises(jbp.CheckpointError, match=r"checkpoint .*absent.npz: no such file"):
        jbp.load_checkpoint(tmp_path / "absent.npz", _state(), _net())


def test_mismatched_checkpoints_are_refused(tmp_path):
    path = tmp_path / "ck.npz"
    jbp.save_checkpoint(path, _state(), _net())
    with pytest.raises(
        jbp.CheckpointError,
        match=r"does not match the network: it was written for Sequential\(layers=\(Dense\(fan_in=2, fan_out=8.* but this run's network is Sequential\(layers=\(Dense\(fan_in=2, fan_out=9",
    ):
        jbp.load_checkpoint(path, _state(_net(9)), _net(9))
    sgd = _state(opt=optax.sgd(0.1))
    with pytest.raises(
        jbp.CheckpointError,
        match=r"does not match the training state: it holds .*ScaleByAdamState.* \(a different optimiser\?\)",
    ):
        jbp.load_checkpoint(path, sgd, _net())
    with pytest.raises(
        jbp.CheckpointError,
        match=r"`\.params\[0\]\['b'\]` is float32\[8\] in the checkpoint but float64\[8\] in this run",
    ):
        jbp.load_checkpoint(path, _state(dtype=jnp.float64), _net())


# --- plots ------------------------------------------------------------------------------


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10,
                "test_accuracy": None} for e in (1, 2, 3)]  # fmt: skip
    path = jbp.plot_curves({"backprop": history, "autodiff": history}, tmp_path / "sub" / "c.png",
                           title="t", note="largest |Δθ| 0")  # fmt: skip
    data = (tmp_path / "sub" / "c.png").read_bytes()
    assert path == str(tmp_path / "sub" / "c.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="`runs` is empty"):
        jbp.plot_curves({}, tmp_path / "d.png")


# --- the command line -------------------------------------------------------------------


def _tiny_csv(tmp_path):
    data = jbp.load_dataset("moons", n=80, seed=0, test_fraction=0.0)
    path = tmp_path / "tiny.csv"
    rows = [
        f"{a!r},{b!r},{int(c)}"
        for (a, b), c in zip(data.x_train.tolist(), data.y_train, strict=True)
    ]
    path.write_text("x1,x2,label\n" + "\n".join(rows) + "\n")
    return path


def test_cli_trains_a_csv_and_resumes(tmp_path, capsys):
    csv, run = _tiny_csv(tmp_path), tmp_path / "run"
    argv = ["train", "--data", str(csv), "--hidden", "8", "--activation", "tanh", "--lr", "0.05",
            "--batch-size", "16", "--epochs", "3", "--run-dir", str(run), "--check-every", "2"]  # fmt: skip
    assert main([*argv, "--max-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "jbp train: tiny.csv: 64 train / 16 test examples, 2 features, 2 classes" in out
    assert "epoch 1/3  step 4  loss" in out and "grad check" in out
    assert "backprop: test accuracy" in out and "(5 steps, stopped at --max-steps)" in out
    assert sorted(os.listdir(run)) == ["checkpoint.npz", "config.json", "metrics.jsonl"]
    assert main([*argv, "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backprop: test accuracy") and "after 3 epochs (12 steps)" in out
    # the same run uninterrupted ends with the same final line
    assert main([*argv[:-4], "--quiet", "--run-dir", str(tmp_path / "whole")]) == 0
    assert capsys.readouterr().out.split(" in ")[0] == out.split(" in ")[0]


def test_cli_both_sources_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    argv = ["train", "--data", "xor", "--hidden", "4", "--activation", "tanh", "--lr", "0.05",
            "--epochs", "2", "--gradient-source", "both", "--quiet", "--plot", str(png),
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backprop: test accuracy" in out and "autodiff: test accuracy" in out
    diff = float(out.split("largest |parameter difference| backprop vs autodiff: ")[1].split()[0])
    assert diff <= 1e-5
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "run")) == ["autodiff", "backprop", "config.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "mnist"], r"--data: unknown data set 'mnist'"),
        (["--data", "{bad}"], r"--data: .*bad.csv: row 2 has 2 columns, expected 3"),
        (
            ["--hidden", "8,x"],
            r"argument --hidden: expected comma-separated layer widths such as 128,64, got '8,x'",
        ),
        (["--activation", "nope"], r"argument --activation: unknown activation 'nope'"),
        (["--lr", "-1"], r"argument --lr: must be a positive finite number, got -1"),
        (["--resume"], r"--resume needs --run-dir"),
        (["--optimizer", "lbfgs"], r"argument --optimizer: invalid choice: 'lbfgs'"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path, capsys, args, message):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0\n3,4\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    assert main(["train", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_refuses_a_corrupt_or_mismatched_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        "xor",
        "--hidden",
        "4",
        "--epochs",
        "1",
        "--quiet",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds a run; add --resume to continue it" in capsys.readouterr().err
    assert main([*argv, "--resume", "--hidden", "5"]) == 2
    assert "--hidden is [5] but the run being resumed used [4]" in capsys.readouterr().err
    (run / "checkpoint.npz").write_bytes(b"garbage")
    assert main([*argv, "--epochs", "2", "--resume"]) == 2
    assert "is corrupt or not a jbp checkpoint" in capsys.readouterr().err


def test_cli_divergence_exits_1(tmp_path, capsys):
    argv = ["train", "--data", "xor", "--hidden", "16,16", "--loss", "half_sse", "--optimizer", "sgd",
            "--lr", "1e15", "--epochs", "20", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert re.search(r"jbp train: backprop: non-finite .* at step \d+", out)


def test_cli_defaults_are_digits_adam_and_backprop():
    from jbp.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.data, args.hidden, args.activation, args.loss) == (
        "digits",
        (128, 64),
        "relu",
        "softmax_xent",
    )
    assert (args.optimizer, args.lr, args.batch_size, args.epochs) == ("adam", 1e-3, 32, 20)
    assert (args.gradient_source, args.check_every, args.run_dir) == ("backprop", 100, None)


def test_bare_jbp_train_reaches_95_percent_on_digits(capsys):
    assert main(["train", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 95.0, out
