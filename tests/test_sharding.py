"""Data parallelism on 4 simulated CPU devices (conftest sets the XLA flag): sharded
results equal single-device ones, and the work really is split. The meshes are
pinned to ``jax.devices("cpu")``, so a GPU/TPU machine runs them too; the one
test of ``jbp train --devices`` (which takes the default backend's devices)
needs 4 of those."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import jbp
import jbp.testing as jt
from jbp.cli import main

CPUS = jax.devices("cpu")
N = 4
NEEDS_N_CPUS = f"needs {N} CPU devices, this process has {len(CPUS)} (conftest asks XLA for 4)"
needs_n_cpus = pytest.mark.skipif(len(CPUS) < N, reason=NEEDS_N_CPUS)
# Sharded vs one device: only the order of the batch sums differs.
RTOL = {"float64": 1e-12, "float32": 2e-5}


@pytest.fixture(scope="module")
def mesh():
    if len(CPUS) < N:
        pytest.skip(NEEDS_N_CPUS)
    return jbp.make_mesh(CPUS[:N])


def _tile(a, reps=N):
    """A batch N times as long, so that it splits over N devices."""
    return jnp.concatenate([a] * reps, axis=0)


def _close(got, want, dtype):
    jbp.compare(
        got, want, rtol=RTOL[jnp.dtype(dtype).name], names=("sharded", "one device")
    ).raise_if_failed()


def test_make_mesh():
    mesh = jbp.make_mesh(CPUS[:1])
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (1,)
    assert jbp.make_mesh(CPUS[-1:], axis="batch").axis_names == ("batch",)
    assert jbp.make_mesh().devices.size == len(jax.devices())
    assert jbp.make_mesh(1).devices.tolist() == jax.devices()[:1]
    for call, error, message in [
        (
            lambda: jbp.make_mesh(len(jax.devices()) + 1),
            ValueError,
            r"`devices` is \d+ but JAX sees \d+ \w+ device\(s\); on a CPU, set "
            r"XLA_FLAGS=--xla_force_host_platform_device_count=",
        ),
        (lambda: jbp.make_mesh(0), ValueError, "`devices` must be at least 1, got 0"),
        (lambda: jbp.make_mesh("all"), TypeError, "`devices` must be an int, a list of devices"),
        (lambda: jbp.replicate({}, "mesh"), TypeError, "`mesh` must be a one-axis"),
    ]:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda m: jbp.shard_batch((jnp.ones((6, 2)), jnp.ones(6)), m),
            ValueError,
            "the batch of 6 examples does not split evenly over 4 devices; use a batch size that "
            "is a multiple of 4",
        ),
        (
            lambda m: jbp.shard_batch((jnp.ones((8, 2)), jnp.ones(4)), m),
            ValueError,
            r"different batch sizes \[4, 8\]",
        ),
        (lambda m: jbp.shard_batch(jnp.float32(1.0), m), ValueError, "holds a scalar"),
        (lambda m: jbp.process_rows(10, m), ValueError, "the batch of 10 examples does not split"),
    ],
)
def test_bad_arguments(mesh, call, error, message):
    with pytest.raises(error, match=message):
        call(mesh)


def test_process_rows_single_process():
    assert jbp.process_rows(12, jbp.make_mesh(CPUS[:1])) == slice(0, 12)
    assert jbp.is_main_process()


@needs_n_cpus
@settings(max_examples=max(1, round(5 * settings.default.max_examples / 25)))
@given(jt.problems(single=False, max_depth=3, max_width=10, max_batch=6))
def test_sharded_gradients_and_per_example_quantities_equal_one_device(problem):
    net, loss, params, x, y = problem
    mesh = jbp.make_mesh(CPUS[:N])
    x, y = _tile(x), _tile(y)
    ps, (xs, ys) = jbp.replicate(params, mesh), jbp.shard_batch((x, y), mesh)
    assert xs.sharding.spec == jax.sharding.PartitionSpec("data")
    dtype = x.dtype
    one = jax.devices("cpu")[0]
    p1, x1, y1 = jax.device_put((params, x, y), one)
    fns = {
        "grads": jbp.backprop(net, loss),
        "norms": jbp.per_example_norms(net, loss),
        "sgs": jbp.sum_grad_squared(net, loss),
        "clipped": jbp.clipped_grad(net, loss, 0.5),
    }
    f = jax.jit(lambda p, x, y: {k: fn(p, x, y) for k, fn in fns.items()})  # one program
    got, want = f(ps, xs, ys), f(p1, x1, y1)
    for k in fns:
        _close(got[k], want[k], dtype)
    assert got["norms"].sharding.spec == jax.sharding.PartitionSpec("data")  # split per example
    for leaf in jax.tree.leaves(got["grads"]):
        assert leaf.sharding.is_fully_replicated
    report = jbp.verify(net, loss, ps, xs, ys)  # the verifier runs on the mesh too
    assert report.ok, report


def test_the_batch_sums_become_cross_device_reductions(mesh):
    """Not vacuous: the compiled program is partitioned, one all-reduce per batch sum."""
    net = jbp.mlp([5, 7, 3], "tanh")
    params = jbp.replicate(net.init(jax.random.key(0)), mesh)
    x, y = jbp.shard_batch((jnp.ones((8, 5), jnp.float32), jnp.zeros(8, jnp.int32)), mesh)
    hlo = jax.jit(jbp.backprop(net, "softmax_xent")).lower(params, x, y).compile().as_text()
    assert "all-reduce" in hlo
    assert "f32[2,5]" in hlo  # each device holds 8 / 4 = 2 rows of x


@pytest.fixture(scope="module")
def moons():
    # 150 training examples: batches of 32 leave a last batch of 22, which does
    # not split over 4 devices and takes the replicated path.
    return jbp.load_dataset("moons", n=188, seed=3)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_fit_on_the_mesh_equals_fit_on_one_device(moons, mesh, dtype):
    assert len(moons.y_train) % 32 % N != 0
    net = jbp.mlp([2, 16, 2], "tanh")
    kwargs = dict(epochs=3, batch_size=32, seed=1, dtype=dtype, check_every=5)
    with jax.default_device(CPUS[0]):  # the same backend as the mesh, on any machine
        one = jbp.fit(net, "softmax_xent", optax.adam(1e-2), moons, **kwargs)
    many = jbp.fit(net, "softmax_xent", optax.adam(1e-2), moons, mesh=mesh, **kwargs)
    for leaf in jax.tree.leaves(many.state.params):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == N
    tol = {jnp.float64: 1e-10, jnp.float32: 1e-4}[dtype]  # adam, 15 steps: round-off grows
    jbp.compare(many.state.params, one.state.params, rtol=tol).raise_if_failed()
    assert int(many.state.step) == int(one.state.step) == 15
    for a, b in zip(many.history, one.history, strict=True):
        assert a["test_accuracy"] == b["test_accuracy"]


def test_data_parallel_step_splits_divisible_batches(mesh):
    net = jbp.mlp([3, 4, 2], "tanh")
    opt = optax.sgd(0.1)
    state = jbp.replicate(jbp.init_state(net, opt, jax.random.key(0)), mesh)
    step = jbp.data_parallel_step(jbp.make_step(net, "softmax_xent", opt, jit=False), mesh)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    y = np.arange(8, dtype=np.int32) % 2
    plain = jbp.make_step(net, "softmax_xent", opt)
    want, want_metrics = plain(jax.device_put(state, CPUS[0]), x, y)
    got, metrics = step(state, x, y)
    jbp.compare(got.params, want.params, rtol=1e-6).raise_if_failed()
    assert float(metrics["loss"]) == pytest.approx(float(want_metrics["loss"]), rel=1e-6)
    got_odd, _ = step(state, x[:7], y[:7])  # 7 rows: replicated, same numbers as one device
    want_odd, _ = plain(jax.device_put(state, CPUS[0]), x[:7], y[:7])
    jbp.compare(got_odd.params, want_odd.params, rtol=1e-6).raise_if_failed()


@pytest.mark.skipif(
    len(jax.devices()) < N,
    reason=f"jbp train --devices {N} takes the default backend's devices: "
    f"{len(jax.devices())} {jax.default_backend()} device(s) here",
)
def test_cli_train_on_four_devices(capsys):
    argv = [
        "train",
        "--data",
        "moons",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--devices",
        "4",
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"backprop: test accuracy \d+\.\d\d% \(\d+/200\)", out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices", "64"], "--devices: `devices` is 64 but JAX sees"),
        pytest.param(
            ["--devices", "4", "--batch-size", "30"],
            "--batch-size 30 does not split evenly over --devices 4; use a multiple of 4",
            marks=pytest.mark.skipif(
                len(jax.devices()) < N, reason=f"needs {N} {jax.default_backend()} devices"
            ),
        ),
    ],
)
def test_cli_devices_errors(capsys, argv, message):
    assert main(["train", "--data", "xor", *argv]) == 2
    assert message in capsys.readouterr().err
