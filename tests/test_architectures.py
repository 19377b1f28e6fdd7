"""Property tests over CNNs, residual and branching networks (``jbp.testing.cnns``,
``jbp.testing.resnets``): backprop = jax.grad eager and under jit, vmap over
single examples, every per-example quantity (both norm forms) = vmap(jax.grad),
and jacfwd(backprop) = hessian(objective).

Each example compiles a new network, so each test draws few, rich examples:
several layers, every loss, both dtypes, batches and single examples.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jbp
import jbp.testing as jt

# relu's dead units can zero a whole gradient; kinks break the Hessian test.
LIVE = tuple(a for a in jbp.activation_names() if a != "relu")
SMOOTH = tuple(a for a in LIVE if a not in ("leaky_relu", "elu"))
NETS = st.one_of(jt.cnns(activations=LIVE), jt.resnets(activations=LIVE))


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


def _nonzero(tree: Any) -> bool:
    return any(np.any(np.asarray(g) != 0) for g in jtu.tree_leaves(tree))


def _check(tested: Any, reference: Any, names: tuple[str, str], **kw: Any) -> None:
    jbp.compare(tested, reference, names=names, **kw).raise_if_failed()


@settings(max_examples=_examples(6))
@given(problem=jt.problems(nets=NETS, max_batch=4))
def test_backprop_matches_jax_grad_eagerly_and_under_jit(problem):
    net, loss, params, x, y = problem
    manual, reference = jbp.backprop(net, loss), jax.grad(jbp.objective(net, loss))
    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(reference)(params, x, y)
        assume(_nonzero(g_ref))
        _check(jax.jit(manual)(params, x, y), g_ref, ("jit(backprop)", "jit(jax.grad)"))
        # jbp's δ rules op by op (no jit) against the same compiled reference
        _check(manual(params, x, y), g_ref, ("backprop", "jit(jax.grad)"))


def _reference_per_example(net: Any, loss: Any, params: Any, x: Any, y: Any) -> Any:
    """g_i = ∂ℓ_i/∂θ by autodiff, one example at a time (unscaled)."""
    objective = jbp.objective(net, loss)
    return jax.vmap(jax.grad(objective), in_axes=(None, 0, 0))(params, x, y)


def _jbp_quantities(net: Any, loss: Any, max_norm: float) -> Any:
    """Every per-example quantity of jbp in one compiled function."""
    fns = {
        "vmap(backprop)": jax.vmap(jbp.backprop(net, loss), in_axes=(None, 0, 0)),
        "per_example_grads": jbp.per_example_grads(net, loss),
        "sum_grad_squared": jbp.sum_grad_squared(net, loss),
        "grad_variance": jbp.grad_variance(net, loss),
        "clipped_grad": jbp.clipped_grad(net, loss, max_norm),
        **{
            f"norms[{m}]": jbp.per_example_norms(net, loss, method=m)
            for m in ("auto", "gram", "materialise")
        },
    }
    return jax.jit(lambda p, x, y: {k: f(p, x, y) for k, f in fns.items()})


@settings(max_examples=_examples(5))
@given(
    problem=jt.problems(nets=NETS, dtypes=("float64",), single=False, max_batch=5),
    max_norm=st.floats(0.05, 5.0),
)
def test_per_example_quantities_match_vmap_of_jax_grad(problem, max_norm):
    net, loss, params, x, y = problem
    ref = jax.jit(_reference_per_example, static_argnums=(0, 1))(net, loss, params, x, y)
    assume(_nonzero(ref))
    got = _jbp_quantities(net, loss, max_norm)(params, x, y)
    b = x.shape[0]
    _check(got["vmap(backprop)"], ref, ("vmap(backprop)", "vmap(jax.grad)"))
    _check(got["per_example_grads"], ref, ("per_example_grads", "vmap(jax.grad)"))
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(b, -1) ** 2, axis=1) for g in jtu.tree_leaves(ref)))
    for m in ("auto", "gram", "materialise"):
        np.testing.assert_allclose(got[f"norms[{m}]"], norms, rtol=1e-10, err_msg=m)
    sq = jtu.tree_map(lambda g: jnp.sum(g * g, axis=0), ref)
    _check(got["sum_grad_squared"], sq, ("sum_grad_squared", "Σ g_i² of vmap(jax.grad)"))
    atol = 1e-12 * max(float(jnp.max(s)) for s in jtu.tree_leaves(sq)) / b
    var = jtu.tree_map(lambda g: jnp.var(g, axis=0), ref)
    _check(got["grad_variance"], var, ("grad_variance", "var of vmap(jax.grad)"), atol=atol)
    scale = 1.0 / b if loss in ("mse", "softmax_xent") else 1.0  # the "mean" losses
    c = jnp.minimum(1.0, max_norm / norms) * scale
    clipped, clip_norms = got["clipped_grad"]
    expected = jtu.tree_map(lambda g: jnp.tensordot(c, g, axes=1), ref)
    _check(clipped, expected, ("clipped_grad", "clip then sum of vmap(jax.grad)"))
    np.testing.assert_allclose(clip_norms, norms, rtol=1e-10)


@settings(max_examples=_examples(3))
@given(
    problem=jt.problems(
        nets=st.one_of(
            jt.cnns(activations=SMOOTH, max_blocks=2, max_channels=3, max_size=5),
            jt.resnets(activations=SMOOTH, max_blocks=2, max_width=4, max_size=4),
        ),
        dtypes=("float64",),
        max_batch=3,
    )
)
def test_jacobian_of_backprop_is_the_hessian(problem):
    net, loss, params, x, y = problem
    jac = jax.jit(jax.jacfwd(jbp.backprop(net, loss)))(params, x, y)
    hessian = jax.jit(jax.hessian(jbp.objective(net, loss)))(params, x, y)
    assume(_nonzero(hessian))
    _check(jac, hessian, ("jacfwd(backprop)", "hessian(objective)"))


@settings(max_examples=_examples(3))
@given(problem=jt.problems(nets=NETS, dtypes=("float64",), single=False, max_batch=4))
def test_a_single_example_is_a_batch_of_one(problem):
    net, loss, params, x, y = problem
    grad_fn, norms_fn = jbp.backprop(net, loss), jbp.per_example_norms(net, loss)

    @jax.jit
    def both(x, y):
        return grad_fn(params, x, y), net.apply(params, x), norms_fn(params, x, y)

    single, out, norms = both(x[0], y[0])
    batch_of_one, out1, norms1 = both(x[:1], y[:1])
    _check(single, batch_of_one, ("backprop(one example)", "backprop(batch of one)"))
    np.testing.assert_allclose(out, out1[0], rtol=1e-12)
    assert norms.shape == (1,)
    np.testing.assert_allclose(norms, norms1, rtol=1e-12)


def test_strategies_draw_every_layer_kind():
    """The families reach every built-in layer and combinator (over a fixed sample)."""
    seen: set[str] = set()

    def walk(layer: Any) -> None:
        seen.add(type(layer).__name__)
        for child in getattr(layer, "layers", ()) + getattr(layer, "branches", ()):
            walk(child)
        if hasattr(layer, "block"):
            walk(layer.block)

    @settings(max_examples=150, database=None, derandomize=True)
    @given(arch=NETS)
    def collect(arch):
        walk(arch.net)
        net_shape = arch.net.output_shape(arch.in_shape)
        assert len(net_shape) >= 1

    collect()
    expected = {
        "Conv", "Dense", "Activation", "MaxPool", "AvgPool", "GlobalAvgPool", "Flatten",
        "LayerNorm", "RMSNorm", "Sequential", "Residual", "Parallel",
    }  # fmt: skip
    assert expected <= seen, expected - seen


def test_recipes_avoid_explicit_pads_beyond_the_kernel():
    """Explicit pads stay within the dilated kernel's extent minus one (see docs:
    larger ones make jax.grad wrong on XLA's CPU in float32)."""

    @settings(max_examples=100, database=None, derandomize=True)
    @given(arch=jt.cnns())
    def check(arch):
        for layer in arch.net.layers:
            if isinstance(layer, jbp.Conv) and not isinstance(layer.padding, str):
                for (lo, hi), k, d in zip(
                    layer.padding, layer.kernel_size, layer.dilation, strict=True
                ):
                    assert max(lo, hi) <= (k - 1) * d

    check()


def test_math_of_the_mixed_norm_rule():
    """The documented count: Gram when T·(I + O) < I·O, else materialise."""
    from jbp.layers._factors import Outer, norm_method

    def outer(t: int, i: int, o: int) -> Outer:
        return Outer(jnp.zeros((1, t, 1, i)), jnp.zeros((1, t, 1, o)), (i, o))

    assert norm_method(outer(1, 3, 4)) == "gram"  # one position: ‖a‖²‖δ‖²
    assert norm_method(outer(4, 64, 64)) == "gram"  # 4·128 < 4096
    assert norm_method(outer(1024, 27, 32)) == "materialise"  # a first conv layer
    assert norm_method(outer(64, 128, 128)) == "materialise"  # 64·256 = 128·128: tie
    assert norm_method(outer(1024, 27, 32), "gram") == "gram"


def test_dp_sgd_works_on_a_cnn():
    """The DP-SGD gradient of a residual CNN: without noise it is the clipped gradient,
    with noise it differs by noise of the documented scale (one key, one draw)."""
    net = jbp.Sequential(
        [
            jbp.Conv(1, 3, (3, 3), "tanh"),
            jbp.Residual(jbp.Sequential([jbp.RMSNorm(3), jbp.Conv(3, 3, (3, 3), "gelu")])),
            jbp.GlobalAvgPool(),
            jbp.Dense(3, 4),
        ]
    )
    params = net.init(jax.random.key(0), jnp.float64, in_shape=(5, 5, 1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5, 5, 1)))
    y = jnp.arange(6) % 4
    key = jax.random.key(1)
    clipped, norms = jax.jit(jbp.clipped_grad(net, "softmax_xent", 0.05))(params, x, y)
    assert jnp.sum(norms > 0.05) >= 3  # clipping is active for most examples
    silent, _ = jax.jit(jbp.dp_grad(net, "softmax_xent", 0.05, 0.0))(params, x, y, key)
    _check(silent, clipped, ("dp_grad(noise 0)", "clipped_grad"))
    noisy, _ = jax.jit(jbp.dp_grad(net, "softmax_xent", 0.05, 2.0))(params, x, y, key)
    noise = jnp.concatenate(
        [
            jnp.ravel(n - c)
            for n, c in zip(jtu.tree_leaves(noisy), jtu.tree_leaves(clipped), strict=True)
        ]
    )
    std = 2.0 * 0.05 / 6  # noise_multiplier · max_norm, over B for a mean loss
    assert 0.7 * std < float(jnp.std(noise)) < 1.3 * std
