"""Mutation test for the new δ rules: plant a classic bug in each, and show that
``jbp.check_layer`` catches it (naming the rule that is wrong) and that
``jbp.verify`` catches it inside a network.

Mutants are written the way a user would write a wrong rule: a subclass with a
wrong ``backward``, or, for the convolution, the module's own rule run with a
``lax`` in which one step of the transpose is wrong (the kernel not flipped, δ
not dilated by the stride, the transpose padded like the forward, stride and
dilation swapped in the weight gradient). Every correct layer passes the same
checks (``test_every_builtin_layer_passes_check_layer``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jbp
from jbp import _precision
from jbp.layers import _conv, _window

# --- the built-in layers pass ------------------------------------------------

LAYERS = [
    (jbp.Dense(3, 4, "tanh"), (3,)),
    (jbp.Dense(3, 4, "gelu", bias=False), (5, 3)),
    (jbp.Activation("softplus"), (2, 3)),
    (jbp.Conv(2, 4, (3, 3), "relu", stride=2), (7, 6, 2)),
    (jbp.Conv(4, 6, 3, "sin", groups=2, dilation=2, padding="VALID"), (9, 4)),
    (jbp.Conv(3, 3, (2, 3), groups=3, stride=(2, 1), padding=((1, 0), (2, 1))), (5, 6, 3)),
    (jbp.Conv(2, 2, (2, 2, 2), padding=1), (3, 4, 3, 2)),
    (jbp.MaxPool((2, 2)), (4, 5, 3)),
    (jbp.MaxPool(3, stride=1, padding="SAME"), (6, 2)),
    (jbp.AvgPool(3, stride=2, padding="SAME"), (7, 2)),
    (jbp.AvgPool((2, 2), stride=1), (3, 4, 2)),
    (jbp.GlobalAvgPool(), (3, 3, 2)),
    (jbp.Flatten(), (2, 3, 4)),
    (jbp.LayerNorm(5), (5,)),
    (jbp.LayerNorm(5, scale=False), (3, 5)),
    (jbp.RMSNorm(4), (2, 4)),
    (jbp.Residual(jbp.Sequential([jbp.LayerNorm(4), jbp.Dense(4, 4, "tanh")])), (3, 4)),
    (jbp.Parallel([jbp.Dense(4, 2), jbp.Conv(4, 3, 1)], merge="concat"), (5, 4)),
    (jbp.Parallel([jbp.Dense(4, 3, "tanh"), jbp.Dense(4, 3)]), (4,)),
    (jbp.Embedding(7, 4), (6,)),
    (jbp.PositionalEmbedding(8, 4), (5, 4)),
    (jbp.MultiHeadAttention(6, 2), (5, 6)),
    (jbp.MultiHeadAttention(6, 3, causal=True, bias=False), (4, 6)),
]


@pytest.mark.parametrize(("layer", "in_shape"), LAYERS, ids=lambda v: repr(v)[:40])
def test_every_builtin_layer_passes_check_layer(layer, in_shape):
    report = jbp.check_layer(layer, in_shape)
    assert report.ok, str(report)
    methods = {row.path.split("[")[0].split("'")[0] for row in report.rows}
    if jax.tree.leaves(layer.init(jax.random.key(0))):
        assert {"per_example_grads", "sum_grad_squared", "weighted_grads"} <= methods


@pytest.mark.parametrize(
    ("layer", "in_shape"),
    [LAYERS[i] for i in (1, 5, 8, 13, 16, 19, 22)],
    ids=lambda v: repr(v)[:40],
)
def test_builtin_layers_pass_check_layer_in_float32(layer, in_shape):
    report = jbp.check_layer(layer, in_shape, dtype=jnp.float32, key=jax.random.key(1))
    assert report.ok, str(report)


# --- mutants -------------------------------------------------------------------


class _Lax:
    """``jax.lax`` with some functions replaced: what one wrong step looks like."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(lax, name)


def _transposed(fn: Any) -> Any:
    """Wrap ``conv_general_dilated`` so that ``fn`` rewrites the keywords of the
    transposed convolution (the one that dilates δ by the stride) only."""

    def conv(lhs: Any, rhs: Any, **kw: Any) -> Any:
        if "lhs_dilation" in kw:
            kw = fn(kw)
        return lax.conv_general_dilated(lhs, rhs, **kw)

    return conv


def _weight_grad(fn: Any) -> Any:
    """Rewrite the keywords of the weight-gradient convolution only."""

    def conv(lhs: Any, rhs: Any, **kw: Any) -> Any:
        if "batch_group_count" in kw:
            kw = fn(kw)
        return lax.conv_general_dilated(lhs, rhs, **kw)

    return conv


CONV_MUTANTS = {
    "unflipped kernel": (
        dict(rev=lambda x, dims: x),
        jbp.Conv(2, 3, (3, 2), "tanh"),
        (5, 4, 2),
        "backward delta_in",
    ),
    "transpose not dilated by the stride": (
        dict(conv_general_dilated=_transposed(lambda kw: {**kw, "lhs_dilation": None})),
        jbp.Conv(2, 3, 3, stride=2),
        (7, 2),
        "backward",
    ),
    "transpose padded like the forward": (
        dict(
            conv_general_dilated=_transposed(
                lambda kw: {**kw, "padding": tuple((hi, lo) for lo, hi in kw["padding"])}
            )
        ),
        jbp.Conv(2, 2, (2, 2)),
        (4, 5, 2),
        "backward delta_in",
    ),
    "stride and dilation swapped in the weight gradient": (
        dict(
            conv_general_dilated=_weight_grad(
                lambda kw: {
                    **kw,
                    "window_strides": kw["rhs_dilation"],
                    "rhs_dilation": kw["window_strides"],
                }
            )
        ),
        jbp.Conv(2, 2, 3, stride=2, dilation=1, padding="VALID"),
        (9, 2),
        "backward grads",
    ),
}


@pytest.mark.parametrize("name", CONV_MUTANTS)
def test_conv_mutant_is_caught(name, monkeypatch):
    overrides, layer, in_shape, where = CONV_MUTANTS[name]
    assert jbp.check_layer(layer, in_shape).ok  # the rule is right before the bug
    monkeypatch.setattr(_conv, "lax", _Lax(**overrides))
    monkeypatch.setattr(_precision, "lax", _Lax(**overrides))  # the convolutions go through it
    report = jbp.check_layer(layer, in_shape)
    assert not report.ok, f"{name} not caught:\n{report}"
    assert any(not r.ok and r.path.startswith(where) for r in report.rows), str(report)
    # A weight-gradient bug shows in the conv's own leaf; a δ bug before it.
    _caught_in_a_network(layer, in_shape, first=1 if where == "backward grads" else 0)


@dataclasses.dataclass(frozen=True)
class MaxPoolToEveryElement(jbp.MaxPool):
    """Bug: each window's δ goes to every element of the window, not its arg-max."""

    def backward(self, params, cache, delta_out):
        dil, pad = self._dilation(), self._pads(cache.shape[1:-1])
        parts = [delta_out] * math.prod(self.window)
        return {}, _window.scatter(parts, cache.shape[1:-1], self.window, self.stride, dil, pad)


@dataclasses.dataclass(frozen=True)
class AvgPoolNotDivided(jbp.AvgPool):
    """Bug: δ spread over the window without dividing by the window size."""

    def backward(self, params, cache, delta_out):
        spatial = cache[1:-1]
        parts = [delta_out] * math.prod(self.window)
        pad = self._pads(spatial)
        return {}, _window.scatter(parts, spatial, self.window, self.stride, self._dilation(), pad)


@dataclasses.dataclass(frozen=True)
class GlobalAvgPoolNotDivided(jbp.GlobalAvgPool):
    """Bug: δ broadcast to every position without the 1/T of the mean."""

    def backward(self, params, cache, delta_out):
        shape = cache[0]
        return {}, lax.broadcast_in_dim(delta_out, shape, (0, len(shape) - 1))


def _layer_norm_delta(layer, params, cache, delta_out, *, mean_term, variance_term):
    xhat, r = cache[:2]
    g = delta_out * params["scale"].reshape((1,) * (delta_out.ndim - 1) + (-1,))
    grads = {
        "scale": jnp.sum(delta_out * xhat, axis=tuple(range(xhat.ndim - 1))),
        "bias": jnp.sum(delta_out, axis=tuple(range(xhat.ndim - 1))),
    }
    d = g
    if mean_term:
        d = d - jnp.mean(g, axis=-1, keepdims=True)
    if variance_term:
        d = d - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    return grads, r * d


@dataclasses.dataclass(frozen=True)
class LayerNormWithoutMean(jbp.LayerNorm):
    """Bug: the mean term −mean(g) of LayerNorm's δ dropped."""

    def backward(self, params, cache, delta_out):
        return _layer_norm_delta(
            self, params, cache, delta_out, mean_term=False, variance_term=True
        )


@dataclasses.dataclass(frozen=True)
class LayerNormWithoutVariance(jbp.LayerNorm):
    """Bug: the variance term −x̂·mean(g ⊙ x̂) of LayerNorm's δ dropped."""

    def backward(self, params, cache, delta_out):
        return _layer_norm_delta(
            self, params, cache, delta_out, mean_term=True, variance_term=False
        )


@dataclasses.dataclass(frozen=True)
class RMSNormWithoutVariance(jbp.RMSNorm):
    """Bug: RMSNorm's δ treated as if the root mean square were a constant."""

    def backward(self, params, cache, delta_out):
        grads, _ = super().backward(params, cache, delta_out)
        xhat, r = cache[:2]
        return grads, r * delta_out * params["scale"].reshape((1,) * (xhat.ndim - 1) + (-1,))


@dataclasses.dataclass(frozen=True)
class ResidualWithoutSkip(jbp.Residual):
    """Bug: the skip path's δ dropped: ∂C/∂a = block.backward(δ_out) alone."""

    def backward_walk(self, params, cache, delta_out, at_leaf):
        results, delta = super().backward_walk(params, cache, delta_out, at_leaf)
        return results, delta - delta_out


class ParallelFirstBranchOnly(jbp.Parallel):
    """Bug: ∂C/∂a from the first branch only (the branches' input δs not summed)."""

    def backward_walk(self, params, cache, delta_out, at_leaf):
        caches = cache[0]
        results, _ = super().backward_walk(params, cache, delta_out, at_leaf)
        _, d0 = jbp.layers._base.backward_walk(
            self.branches[0], params[0], caches[0], delta_out, None
        )
        return results, d0


@dataclasses.dataclass(frozen=True)
class FlattenColumnMajor(jbp.Flatten):
    """Bug: δ reshaped back in the wrong (column-major) order."""

    def backward(self, params, cache, delta_out):
        b = cache[0]
        back = delta_out.reshape((b, *cache[1:][::-1]))
        return {}, jnp.transpose(back, (0, *range(back.ndim - 1, 0, -1)))


INNER = jbp.Sequential([jbp.LayerNorm(4), jbp.Dense(4, 4, "tanh")])
MUTANTS = {
    "MaxPool δ to every window element": (MaxPoolToEveryElement((2, 2)), (4, 4, 2)),
    "AvgPool δ not divided by the window size": (AvgPoolNotDivided(2, stride=1), (5, 2)),
    "GlobalAvgPool δ not divided by T": (GlobalAvgPoolNotDivided(), (3, 4, 2)),
    "LayerNorm mean term dropped": (LayerNormWithoutMean(5), (2, 5)),
    "LayerNorm variance term dropped": (LayerNormWithoutVariance(5), (5,)),
    "RMSNorm variance term dropped": (RMSNormWithoutVariance(4), (3, 4)),
    "Residual skip δ dropped": (ResidualWithoutSkip(INNER), (4,)),
    "Parallel input δs not summed": (
        ParallelFirstBranchOnly([jbp.Dense(4, 3, "tanh"), jbp.Dense(4, 3)]),
        (4,),
    ),
    "Flatten δ reshaped column-major": (FlattenColumnMajor(), (3, 2, 2)),
}


@pytest.mark.parametrize("name", MUTANTS)
def test_layer_mutant_is_caught(name):
    layer, in_shape = MUTANTS[name]
    report = jbp.check_layer(layer, in_shape)
    assert not report.ok, f"{name} not caught:\n{report}"
    # These bugs are in ∂C/∂a only: the parameter gradients still agree.
    failing = {r.path for r in report.rows if not r.ok}
    assert failing == {"backward delta_in"}, str(report)
    _caught_in_a_network(layer, in_shape)


def _caught_in_a_network(layer: Any, in_shape: tuple[int, ...], first: int = 0) -> None:
    """A Dense layer before the mutant (so its ∂C/∂a reaches a parameter), a
    Flatten and a Dense after: jbp.verify fails with its first mismatch in layer
    ``first`` (a mutant whose δ has the wrong shape may instead crash the
    backward pass: also caught)."""
    width = in_shape[-1]
    out = jbp.layers._base.output_shape(layer, in_shape)
    net = jbp.Sequential(
        [
            jbp.Dense(width, width, "tanh"),
            layer,
            jbp.Flatten(),
            jbp.Dense(math.prod(out), 2),
        ]
    )
    params = net.init(jax.random.key(0), jnp.float64)
    params = jax.tree.map(lambda a: a + 0.3, params)  # nonzero biases, scales off 1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, *in_shape)))
    y = jnp.asarray(rng.standard_normal((3, 2)))
    try:
        report = jbp.verify(net, "half_sse", params, x, y)
    except (TypeError, ValueError):
        return
    assert not report.ok, str(report)
    assert report.first_mismatch is not None and report.first_mismatch.layer == first, str(report)
