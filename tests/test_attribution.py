"""Data attribution: per-example gradient dot products against materialised autodiff
gradients, TracIn over kept params, in-run data Shapley inside fit, and their errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbp
import jbp._attribution as attribution
from jbp._architectures import FAMILIES
from jbp._zoo import random_problem
from jbp.layers import _factors


def _reference_grads(net, loss, params, x, y, mask=None):
    """Every example's gradient by autodiff, flattened: ``(B, P)``."""
    obj = jbp.objective(net, loss)

    def one(p, xi, yi, mi):
        m = None if mi is None else mi[None]
        return jax.grad(obj)(p, xi[None], yi[None], mask=m)  # reference

    @jax.jit
    def all_of(p, x, y, mask):
        g = jax.vmap(one, in_axes=(None, 0, 0, None if mask is None else 0))(p, x, y, mask)
        return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(g)], 1)

    return all_of(params, x, y, mask)


def _problem(family: str, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        p = random_problem(rng, dtype=jnp.float64, arch=family, max_depth=2, max_width=6)
        if "single example" not in p.description and p.x.shape[0] >= 3:
            return p


def _all_dots(net, loss):
    """Every form of per_example_dots in one compiled function."""
    fns = {m: jbp.per_example_dots(net, loss, method=m) for m in ("gram", "materialise")}
    per_layer = jbp.per_example_dots(net, loss, per_layer=True)

    @jax.jit
    def run(params, x, y, x2, y2, m, m2):
        out = {k: f(params, x, y, x2, y2, mask=m, mask_other=m2) for k, f in fns.items()}
        out["per_layer"] = per_layer(params, x, y, x2, y2, mask=m, mask_other=m2)
        return out

    return run


def _split(p):
    k = p.x.shape[0] // 2
    m = p.mask
    cut = lambda a, s: None if a is None else a[s]  # noqa: E731
    return (p.x[:k], p.y[:k], cut(m, slice(0, k))), (p.x[k:], p.y[k:], cut(m, slice(k, None)))


@settings(max_examples=len(FAMILIES), deadline=None)
@given(st.sampled_from(FAMILIES), st.integers(0, 2**16))
def test_per_example_dots_equal_materialised_autodiff_dot_products(family, seed):
    """Every family, float64: the Gram form, the materialised form and, layer by layer,
    the cheaper of the two equal G Gᵀ of vmap(jax.grad)."""
    p = _problem(family, seed)
    (x, y, m), (x2, y2, m2) = _split(p)
    g = _reference_grads(p.net, p.loss, p.params, p.x, p.y, p.mask)
    k = x.shape[0]
    want = g[:k] @ g[k:].T
    got = jax.device_get(_all_dots(p.net, p.loss)(p.params, x, y, x2, y2, m, m2))
    scale = float(np.max(np.abs(want))) + 1e-300
    for name in ("gram", "materialise"):
        np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-12 * scale, err_msg=name)
    auto = sum(got["per_layer"].values())  # the cheaper form per leaf, layer by layer
    np.testing.assert_allclose(auto, want, rtol=1e-9, atol=1e-12 * scale)
    assert all(k.startswith("layers[") for k in got["per_layer"])


def _tied_net():
    return jbp.Sequential([
        jbp.Embedding(7, 4),
        jbp.Dense(4, 4, "tanh"),
        jbp.Tied(jbp.Dense(4, 7, bias=False), source=0, leaves={"w": "table"}, transpose=True),
    ])  # fmt: skip


def test_shared_table_dots_keep_the_cross_terms_of_its_two_uses():
    """A table used by the embedding (gather) and transposed by the output head (outer):
    the gather–gather, gather–outer and outer–outer pairs, in both forms; the batch
    against itself per layer, and cosines."""
    net = _tied_net()
    params = net.init(jax.random.key(1), jnp.float64)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 7, (5, 3)), rng.integers(0, 7, (5, 3))
    g = _reference_grads(net, "softmax_xent", params, x, y)
    fns = {m: jbp.per_example_dots(net, "softmax_xent", method=m) for m in ("gram", "materialise")}
    per_layer = jbp.per_example_dots(net, "softmax_xent", per_layer=True)
    cosine = jbp.per_example_dots(net, "softmax_xent", cosine=True)

    @jax.jit
    def run(params, x, y):
        out = {m: f(params, x[:2], y[:2], x[2:], y[2:]) for m, f in fns.items()}
        return out, per_layer(params, x, y), cosine(params, x, y)

    got, per_layer, cos = jax.device_get(run(params, x, y))
    for method in ("gram", "materialise"):
        np.testing.assert_allclose(got[method], g[:2] @ g[2:].T, rtol=1e-10, err_msg=method)
    # the batch against itself, and cosines, layer by layer
    np.testing.assert_allclose(sum(per_layer.values()), g @ g.T, rtol=1e-10)
    norms = np.linalg.norm(g, axis=1)
    np.testing.assert_allclose(cos, (g @ g.T) / np.outer(norms, norms), rtol=1e-9)
    np.testing.assert_allclose(np.diag(cos), 1.0, rtol=1e-12)


def _truncate_positions(f):
    """A factor with only its first position: the positions no longer summed."""
    if isinstance(f, _factors.Outer):
        return f._replace(a=tuple(a[:, :1] for a in f.blocks), delta=f.delta[:, :1])
    return f


def _conv_net():
    return jbp.Sequential(
        [jbp.Conv(1, 2, (3, 3), "tanh", padding="VALID"), jbp.Flatten(), jbp.Dense(18, 3)]
    )


def _drop_bias(cross):
    def mutant(f, g, method="auto"):
        out = cross(f, g, method)
        return 0 * out if isinstance(f, _factors.Elementwise) else out

    return mutant


@pytest.mark.parametrize(
    "mutant, net, shape",
    [
        (lambda cross: lambda f, g, m="auto": cross(_truncate_positions(f), g, m),
         _conv_net(), (5, 5, 1)),
        (_drop_bias, jbp.mlp([4, 5, 3], "tanh"), (4,)),
    ],
    ids=["positions-not-summed", "bias-term-dropped"],
)  # fmt: skip
def test_the_dot_product_check_catches_a_broken_factor_rule(monkeypatch, mutant, net, shape):
    params = net.init(jax.random.key(2), jnp.float64)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, *shape)), rng.integers(0, 3, 6)
    g = _reference_grads(net, "softmax_xent", params, x, y)
    want = g[:3] @ g[3:].T
    dots = jax.jit(jbp.per_example_dots(net, "softmax_xent"))
    np.testing.assert_allclose(dots(params, x[:3], y[:3], x[3:], y[3:]), want, rtol=1e-9)
    monkeypatch.setattr(attribution, "cross", mutant(_factors.cross))
    broken = jax.jit(jbp.per_example_dots(net, "softmax_xent"))(params, x[:3], y[:3], x[3:], y[3:])
    assert not np.allclose(broken, want, rtol=1e-6)


# --- TracIn and in-run values on a small fit run -------------------------------------------


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A short float64 SGD run on digits that keeps its params and in-run values."""
    data = jbp.load_dataset("digits")
    net = jbp.mlp([64, 12, 10], "tanh")
    lr = optax.linear_schedule(0.2, 0.05, 12)
    val = (data.x_test[:40], data.y_test[:40])
    run_dir = tmp_path_factory.mktemp("attribution") / "run"
    shapley = jbp.InRunShapley(*val, learning_rate=lr, batch_size=16, seed=1)
    result = jbp.fit(
        net, "softmax_xent", optax.sgd(lr), data, epochs=2, batch_size=128, seed=3,
        dtype=jnp.float64, run_dir=run_dir, keep_every=4, shapley=shapley,
    )  # fmt: skip
    return data, net, lr, shapley, run_dir, result


def test_tracin_equals_the_sum_over_checkpoints_of_materialised_gradients(small_run):
    data, net, lr, _, run_dir, _ = small_run
    tracin = jbp.TracIn.from_run(run_dir, net, "softmax_xent", lr, chunk_size=100)
    assert tracin.steps == (4, 8, 12, 16, 20, 24)  # 12 steps an epoch, kept every 4
    x_tr, y_tr = data.x_train[:250].astype(np.float64), data.y_train[:250]  # 3 chunks
    x_te, y_te = data.x_test[:3].astype(np.float64), data.y_test[:3]
    want_inf, want_self = 0.0, 0.0
    for step in tracin.steps:
        params, _ = jbp._checkpoint.read_params(run_dir / "params" / f"step_{step:08d}.npz", net)
        g_tr = _reference_grads(net, "softmax_xent", params, x_tr, y_tr)
        g_te = _reference_grads(net, "softmax_xent", params, x_te, y_te)
        want_inf += float(lr(step)) * np.asarray(g_te @ g_tr.T)
        want_self += float(lr(step)) * np.sum(np.asarray(g_tr) ** 2, axis=1)
    np.testing.assert_allclose(tracin.self_influence(x_tr, y_tr), want_self, rtol=1e-10)
    props = tracin.proponents(x_te, y_te, x_tr, y_tr, k=4)
    np.testing.assert_allclose(props.influence, want_inf, rtol=1e-9, atol=1e-12)
    for t in range(3):
        top = np.sort(want_inf[t])
        np.testing.assert_allclose(want_inf[t, props.proponents[t]], top[::-1][:4], rtol=1e-9)
        np.testing.assert_allclose(want_inf[t, props.opponents[t]], top[:4], rtol=1e-9)


def test_in_run_values_are_the_first_order_change_of_the_validation_loss():
    """One SGD step of a tiny float64 network: each batch example's value is
    η·(1/B)·⟨∇L_val, ∇ℓ_i⟩ by autodiff, and the step's values add up to the derivative of
    the validation loss along the update (jax.jvp), which the actual loss change
    approaches as O(η²)."""
    net = _conv_net()
    loss, eta = "softmax_xent", 0.05
    rng = np.random.default_rng(0)
    x, xv = rng.normal(size=(6, 5, 5, 1)), rng.normal(size=(4, 5, 5, 1))
    y, yv = rng.integers(0, 3, 6), rng.integers(0, 3, 4)
    state = jbp.init_state(net, optax.sgd(eta), jax.random.key(0), dtype=jnp.float64)
    step = jax.jit(
        jbp._train_shapley.shapley_step(net, jbp._losses.get_loss(loss), optax.sgd(eta), eta)
    )
    new, metrics = step(state, x, y, None, xv, yv, None)
    obj = jax.jit(jbp.objective(net, loss))
    grad = jax.jit(jax.grad(jbp.objective(net, loss)))  # reference
    g_val = grad(state.params, xv, yv)
    g_i = _reference_grads(net, loss, state.params, x, y)
    flat = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(g_val)])
    np.testing.assert_allclose(metrics["values"], eta / 6 * (g_i @ flat), rtol=1e-10)
    batch_grad = grad(state.params, x, y)
    np.testing.assert_allclose(
        jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(new.params)]),
        jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(
            jax.tree.map(lambda p, g: p - eta * g, state.params, batch_grad))]),
        rtol=1e-12,
    )  # fmt: skip
    direction = jax.tree.map(lambda g: -eta * g, batch_grad)
    _, slope = jax.jvp(lambda p: obj(p, xv, yv), (state.params,), (direction,))  # reference
    np.testing.assert_allclose(jnp.sum(metrics["values"]), -slope, rtol=1e-10)
    changes = []
    for h in (1.0, 0.5):
        moved = jax.tree.map(lambda p, d, h=h: p + h * d, state.params, direction)
        changes.append(float(obj(state.params, xv, yv) - obj(moved, xv, yv)) / h)
    first = float(jnp.sum(metrics["values"]))
    assert abs(changes[1] - first) < 0.6 * abs(changes[0] - first)  # the error shrinks ~ h


def test_in_run_values_survive_a_resume_and_match_one_uninterrupted_run(small_run, tmp_path):
    data, net, lr, shapley, _, whole = small_run
    assert whole.shapley.shape == (len(data.y_train),) and np.any(whole.shapley != 0)
    # every example was in one batch an epoch: a value from each of the two epochs
    run = dict(
        net=net, loss="softmax_xent", optimizer=optax.sgd(lr), data=data, batch_size=128,
        seed=3, dtype=jnp.float64, run_dir=tmp_path / "r", shapley=shapley,
    )  # fmt: skip
    jbp.fit(**run, epochs=2, max_steps=17)
    resumed = jbp.fit(**run, epochs=2, resume=True)
    np.testing.assert_allclose(resumed.shapley, whole.shapley, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "shapley.npy"), resumed.shapley)
    with pytest.raises(jbp.CheckpointError, match="written by a run with `shapley`"):
        jbp.fit(**{**run, "shapley": None}, epochs=3, resume=True)


def test_attribution_argument_errors(tmp_path):
    data = jbp.load_dataset("xor")
    net = jbp.mlp([2, 3, 2])
    opt = optax.sgd(0.1)
    val = jbp.InRunShapley(data.x_test, data.y_test, 0.1)
    with pytest.raises(ValueError, match="`shapley` with `privacy`"):
        jbp.fit(
            net, "softmax_xent", opt, data, shapley=val, privacy=jbp.Privacy(noise_multiplier=1.0)
        )
    with pytest.raises(ValueError, match="`shapley` with `gradient_source='autodiff'`"):
        jbp.fit(net, "softmax_xent", opt, data, shapley=val, gradient_source="autodiff")
    with pytest.raises(TypeError, match=r"`shapley` must be a jbp.InRunShapley"):
        jbp.fit(net, "softmax_xent", opt, data, shapley=(data.x_test, data.y_test))
    with pytest.raises(ValueError, match=r"`shapley.x` must have shape"):
        jbp.fit(net, "softmax_xent", opt, data, shapley=jbp.InRunShapley(data.x_test[0], [1], 0.1))
    with pytest.raises(ValueError, match="`keep_every` keeps params in a run folder"):
        jbp.fit(net, "softmax_xent", opt, data, keep_every=2)
    with pytest.raises(ValueError, match=r"`learning_rate` must be a positive float, got -0\.1"):
        jbp.InRunShapley(data.x_test, data.y_test, -0.1)
    with pytest.raises(TypeError, match="`learning_rate` must be a positive float or a schedule"):
        jbp.InRunShapley(data.x_test, data.y_test, "0.1")
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer ≥ 1, got 0"):
        jbp.InRunShapley(data.x_test, data.y_test, 0.1, batch_size=0)
    with pytest.raises(ValueError, match="keeps no params for TracIn"):
        jbp.TracIn.from_run(tmp_path, net, "softmax_xent", 0.1)
    with pytest.raises(ValueError, match=r"`checkpoints` must be a non-empty sequence"):
        jbp.TracIn(net, "softmax_xent", [])
    with pytest.raises(ValueError, match=r"`checkpoints\[1\] learning rate` must be in \(0, inf\)"):
        jbp.TracIn(net, "softmax_xent", [(None, 0.1), (None, 0.0)])
    params = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match="`x_other` and `y_other` go together"):
        jbp.per_example_dots(net, "softmax_xent")(params, data.x_test, data.y_test, data.x_test)
    with pytest.raises(ValueError, match="`method` must be one of"):
        jbp.per_example_dots(net, "softmax_xent", method="ghost")
