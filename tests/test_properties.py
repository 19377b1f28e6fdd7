"""Property tests over random architectures: backprop = jax.grad, and its invariants.

Every problem comes from the public strategies in ``jbp.testing``. Each test
compiles new XLA programs for every example it draws (about a second on a
2-core CPU), so tests other than the central one run fewer examples than the
hypothesis profile's count; ``_examples`` scales those counts with the profile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import jbp
import jbp.testing as jt

# Captured at collection, before any test registers an activation of its own.
ACTIVATIONS = jbp.activation_names()
# relu's kink makes finite differences and the Taylor test fail when a step
# crosses it; its dead units can also zero the δ that reaches a planted bug.
KINKED = ("relu", "leaky_relu")
SMOOTH = tuple(a for a in ACTIVATIONS if a not in KINKED)
LIVE = tuple(a for a in ACTIVATIONS if a != "relu")

REDUCTION = {"half_sse": "sum", "sigmoid_bce": "sum", "mse": "mean", "softmax_xent": "mean"}


def _examples(n: int) -> int:
    """``n`` examples under the "ci" profile (25), scaled with other profiles."""
    return max(1, round(n * settings.default.max_examples / 25))


def _problems(**kwargs: Any) -> st.SearchStrategy[Any]:
    kwargs.setdefault("activations", ACTIVATIONS)
    return jt.problems(**kwargs)


def _grad_fns(net: Any, loss: Any) -> tuple[Any, Any]:
    return jbp.backprop(net, loss), jax.grad(jbp.objective(net, loss))


def _assume_nonzero(grads: Any) -> None:
    """Skip the rare example whose gradient is identically zero (e.g. every
    output unit of a relu layer dead): there both sides agree trivially."""
    assume(any(np.any(np.asarray(g) != 0) for g in jtu.tree_leaves(grads)))


def _check(tested: Any, reference: Any, names: tuple[str, str]) -> jbp.Report:
    return jbp.compare(tested, reference, names=names).raise_if_failed()


def _stack(trees: list[Any]) -> Any:
    return jtu.tree_map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *trees)


def _failing_layers(report: jbp.Report) -> list[int | None]:
    return sorted({row.layer for row in report.rows if not row.ok})


def test_reduction_table_covers_every_loss():
    assert set(REDUCTION) == set(jbp.loss_names())


@given(problem=_problems())
def test_backprop_matches_jax_grad_under_jit(problem):
    net, loss, params, x, y = problem
    manual, reference = (jax.jit(f) for f in _grad_fns(net, loss))
    with jax.default_matmul_precision("highest"):
        g_ref = reference(params, x, y)
        _assume_nonzero(g_ref)
        _check(manual(params, x, y), g_ref, ("jit(backprop)", "jit(jax.grad)"))


@settings(max_examples=_examples(6))
@given(problem=_problems(max_depth=3, max_width=6, max_batch=6))
def test_backprop_matches_jax_grad_eagerly(problem):
    """backprop run op by op (no jit) against the reference; the reference is compiled
    (one program, not one per op): the eager path under test is jbp's."""
    net, loss, params, x, y = problem
    manual, reference = _grad_fns(net, loss)
    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(reference)(params, x, y)
        _assume_nonzero(g_ref)
        _check(manual(params, x, y), g_ref, ("backprop", "jit(jax.grad)"))


@settings(max_examples=_examples(10))
@given(problem=_problems(dtypes=("float64",), max_depth=4, max_width=12, single=False, max_batch=8))
def test_vmap_equals_loop_and_reduces_to_batch_gradient(problem):
    net, loss, params, x, y = problem
    grad_fn = jbp.backprop(net, loss)
    per_example, batch = jax.device_get(
        jax.jit(
            lambda p, x, y: (jax.vmap(grad_fn, in_axes=(None, 0, 0))(p, x, y), grad_fn(p, x, y))
        )(params, x, y)
    )
    _assume_nonzero(per_example)
    single = jax.jit(grad_fn)
    xs, ys = np.asarray(x), np.asarray(y)  # rows sliced in numpy: no op compiled per slice
    loop = _stack([single(params, xs[i], ys[i]) for i in range(xs.shape[0])])
    _check(per_example, loop, ("vmap(backprop)", "loop over examples"))

    reduce = np.sum if REDUCTION[loss] == "sum" else np.mean
    combined = jtu.tree_map(lambda g: reduce(g, axis=0), per_example)
    _check(combined, batch, (f"{reduce.__name__} of g_i", "batch"))


@settings(max_examples=_examples(10))
@given(
    problem=_problems(dtypes=("float64",), max_depth=4, max_width=12, single=False, min_batch=2),
    data=st.data(),
)
def test_split_batch_gradients_combine(problem, data):
    net, loss, params, x, y = problem
    batch = x.shape[0]
    k = data.draw(st.integers(1, batch - 1), label="split")
    grad_fn = jbp.backprop(net, loss)
    whole, first, second = jax.device_get(  # the three batches in one program
        jax.jit(
            lambda p, x, y: (grad_fn(p, x, y), grad_fn(p, x[:k], y[:k]), grad_fn(p, x[k:], y[k:]))
        )(params, x, y)
    )
    _assume_nonzero(whole)
    if REDUCTION[loss] == "sum":
        combined = jtu.tree_map(np.add, first, second)
    else:
        combined = jtu.tree_map(lambda a, b: (k * a + (batch - k) * b) / batch, first, second)
    _check(combined, whole, (f"halves 0:{k} and {k}:{batch}", "whole batch"))


@settings(max_examples=_examples(10))
@given(
    problem=_problems(
        dtypes=("float64",), activations=SMOOTH, max_depth=3, max_width=8, max_batch=8
    )
)
def test_finite_differences_agree(problem):
    net, loss, params, x, y = problem
    report = jbp.verify(net, loss, params, x, y, finite_differences=True)
    assert report.finite_differences is not None and report.taylor is not None
    _assume_nonzero([report.finite_differences.grad_norm])
    assert report.ok, str(report)


@settings(max_examples=_examples(8))
@given(problem=_problems(dtypes=("float64",), max_depth=3, max_width=6, max_batch=6))
def test_jacobian_of_backprop_is_the_hessian(problem):
    net, loss, params, x, y = problem
    jac = jax.jit(jax.jacfwd(jbp.backprop(net, loss)))(params, x, y)
    hessian = jax.jit(jax.hessian(jbp.objective(net, loss)))(params, x, y)
    _assume_nonzero(hessian)
    _check(jac, hessian, ("jacfwd(backprop)", "hessian(objective)"))


@settings(max_examples=_examples(8))
@given(problem=_problems(max_depth=4, max_width=16))
def test_value_and_backprop_value_is_the_objective(problem):
    net, loss, params, x, y = problem
    value, grads = jax.jit(jbp.value_and_backprop(net, loss))(params, x, y)
    expected = jax.jit(jbp.objective(net, loss))(params, x, y)
    assert value.shape == () and value.dtype == expected.dtype
    rtol = 1e-12 if expected.dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(value, expected, rtol=rtol)
    _check(
        grads, jax.jit(jbp.backprop(net, loss))(params, x, y), ("value_and_backprop", "backprop")
    )


# --- a user-defined layer with its own hand-written backward -----------------


@dataclasses.dataclass(frozen=True)
class Scale(jbp.Layer):
    """``out = a ⊙ s`` with ``s`` of shape ``(features,)``.

    δ rule: ``∂C/∂s = Σ_batch ∂C/∂out ⊙ a``; ``∂C/∂a = ∂C/∂out ⊙ s``.
    """

    features: int

    @property
    def fan_in(self) -> int:
        return self.features

    @property
    def fan_out(self) -> int:
        return self.features

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> Any:
        return {"s": jnp.ones((self.features,), dtype)}

    def forward(self, params: Any, a: jax.Array) -> tuple[jax.Array, Any]:
        return a * params["s"][None, :], a

    def backward(self, params: Any, cache: Any, delta_out: jax.Array) -> tuple[Any, jax.Array]:
        a = cache
        return {"s": jnp.sum(delta_out * a, axis=0)}, delta_out * params["s"][None, :]


@dataclasses.dataclass(frozen=True)
class ScaleForgetsInput(Scale):
    """Planted bug: ``∂C/∂s = Σ_batch ∂C/∂out``, the input ``a`` forgotten."""

    def backward(self, params: Any, cache: Any, delta_out: jax.Array) -> tuple[Any, jax.Array]:
        return {"s": jnp.sum(delta_out, axis=0)}, delta_out * params["s"][None, :]


@st.composite
def nets_with_scale(draw: Any) -> jbp.Sequential:
    """A random architecture with a :class:`Scale` layer inserted anywhere."""
    base = draw(jt.architectures(max_depth=3, max_width=8, activations=LIVE))
    layers = list(base.layers)
    i = draw(st.integers(0, len(layers)), label="Scale position")
    width = next(
        (layer.fan_out for layer in reversed(layers[:i]) if hasattr(layer, "fan_out")),
        base.fan_in,
    )
    layers.insert(i, Scale(width))
    return jbp.Sequential(layers)


@settings(max_examples=_examples(8))
@given(problem=jt.problems(nets=nets_with_scale(), dtypes=("float64",), max_batch=8))
def test_user_layer_verifies_and_its_planted_bug_is_caught(problem):
    net, loss, params, x, y = problem
    report = jbp.verify(net, loss, params, x, y)
    assert report.ok, str(report)
    [index] = [i for i, layer in enumerate(net.layers) if isinstance(layer, Scale)]
    assert any(row.layer == index and row.scale > 0 for row in report.rows)

    buggy = jbp.Sequential(
        [ScaleForgetsInput(la.features) if isinstance(la, Scale) else la for la in net.layers]
    )
    report = jbp.verify(buggy, loss, params, x, y)
    assert not report.ok, str(report)
    # Only ∂C/∂s is wrong: δ passes through the layer correctly.
    assert _failing_layers(report) == [index], str(report)


def test_strategies_reject_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        jt.activations(names=["nope"])
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        jt.losses(names=["nope"])
    with pytest.raises(ValueError, match="`min_depth`=3 is larger than `max_depth`=2"):
        jt.architectures(min_depth=3, max_depth=2)
    with pytest.raises(ValueError, match="`min_size` must be an int >= 1"):
        jt.batch_sizes(min_size=0)
    with pytest.raises(ValueError, match="floating"):
        jt.dtypes(names=("int32",))
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64 is off"):
        jt.dtypes(names=("float64",))


@settings(max_examples=_examples(25))
@given(dtype=jt.dtypes(), batch=jt.batch_sizes(min_size=2, max_size=3))
def test_dtypes_and_batch_sizes(dtype, batch):
    assert dtype in (jnp.dtype("float32"), jnp.dtype("float64"))
    assert batch is None or 2 <= batch <= 3


@settings(max_examples=_examples(25))
@given(
    net=jt.architectures(fan_in=3, fan_out=2, min_depth=2, max_depth=4, min_width=2, max_width=5)
)
def test_architectures_respect_their_bounds(net):
    dense = [layer for layer in net.layers if isinstance(layer, jbp.Dense)]
    assert 2 <= len(dense) <= 4
    assert net.fan_in == 3 and net.fan_out == 2
    assert all(2 <= layer.fan_out <= 5 for layer in dense[:-1])
    assert all(isinstance(layer, (jbp.Dense, jbp.Activation)) for layer in net.layers)


@settings(max_examples=_examples(25))
@given(problem=_problems(max_depth=2, max_width=4))
def test_problems_fit_their_network_and_loss(problem):
    net, loss, params, x, y = problem
    dtype = x.dtype
    assert all(leaf.dtype == dtype for leaf in jtu.tree_leaves(params))
    assert x.shape[-1] == net.fan_in and x.ndim in (1, 2)
    batch = x.shape[:-1]
    if jnp.issubdtype(y.dtype, jnp.integer):
        assert loss == "softmax_xent" and y.shape == batch
        assert 0 <= int(y.min()) and int(y.max()) < net.fan_out
    else:
        assert y.shape == (*batch, net.fan_out) and y.dtype == dtype
    if loss == "softmax_xent":
        assert net.fan_out >= 2
    if loss == "sigmoid_bce":
        assert 0 <= float(y.min()) and float(y.max()) <= 1
    for layer, p in zip(net.layers, params, strict=True):
        if isinstance(layer, jbp.Dense) and layer.bias:
            assert np.all(np.asarray(p["b"]) != 0)


@settings(max_examples=_examples(3))
@given(problem=_problems(params_from_init=True, max_depth=2, max_width=4, bias=True))
def test_problems_from_net_init_have_nonzero_biases(problem):
    net, _, params, x, _ = problem
    for layer, p in zip(net.layers, params, strict=True):
        if isinstance(layer, jbp.Dense):
            assert p["w"].shape == (layer.fan_in, layer.fan_out) and p["w"].dtype == x.dtype
            assert np.all(np.asarray(p["b"]) != 0)
