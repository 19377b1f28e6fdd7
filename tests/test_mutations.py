"""Mutation test: plant classic bugs in δ rules; one property check catches every one.

Each mutant is a wrong δ rule written the way a user would write their own:
an activation registered with a wrong derivative, a ``jbp.Dense`` subclass
with a wrong ``backward``, or a ``jbp.Loss`` with a wrong output δ or a
mismatched reduction. No library file is touched. For every mutant and every
drawn problem, the unmutated network must pass :func:`property_check` and the
mutant must fail it, with exactly the layers the bug reaches failing: a bug
in layer ``k``'s δ makes every parameterised layer ``≤ k`` fail, a bug in its
``∂C/∂a`` every one ``< k``, a bug in its weight or bias gradient layer ``k``
alone, and a bug in the loss every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import jbp
import jbp.testing as jt

# Captured at collection, before the mutant activations below are registered.
LIVE = tuple(a for a in jbp.activation_names() if a != "relu")  # no dead units: δ ≠ 0


def property_check(net: Any, loss: Any, params: Any, x: Any, y: Any) -> jbp.Report:
    """The one check every mutant must fail: ``jbp.backprop`` against ``jax.grad``."""
    return jbp.verify(net, loss, params, x, y)


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


# --- mutant activations: f' wrong, registered like any user activation -------

MUTANT_ACTIVATIONS = {
    # σ' replaced by σ itself: f where f' belongs.
    "mut_sigmoid_f_not_fprime": (jax.nn.sigmoid, lambda z, out: out),
    # σ'(a) = σ(a)(1 − σ(a)) evaluated at the output a = σ(z) instead of at z.
    "mut_sigmoid_fprime_of_output": (
        jax.nn.sigmoid,
        lambda z, out: jax.nn.sigmoid(out) * (1 - jax.nn.sigmoid(out)),
    ),
    # tanh' = 1 − tanh²(z) written as 1 − z².
    "mut_tanh_fprime_of_z": (jnp.tanh, lambda z, out: 1 - z * z),
}


@pytest.fixture(scope="module", autouse=True)
def _mutant_activations():
    """Register the mutants for this module only.

    jbp has no public way to unregister an activation, so the registry is
    swapped for a copy and restored afterwards: later test modules that loop
    over ``jbp.activation_names()`` never see a mutant.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jbp._activations, "_REGISTRY", dict(jbp._activations._REGISTRY))
        for name, (f, derivative) in MUTANT_ACTIVATIONS.items():
            jbp.register_activation(name, f, derivative)
        yield


def _with_activation(name: str) -> Callable[[jbp.Dense], Any]:
    return lambda layer: dataclasses.replace(layer, activation=name)


# --- mutant Dense layers: a wrong backward ----------------------------------


def _fprime(layer: jbp.Dense, z: jax.Array, out: jax.Array, g: jax.Array) -> jax.Array:
    """g ⊙ f'(z), through the public Activation layer's δ rule."""
    return jbp.Activation(layer.activation).backward({}, (z, out), g)[1]


def _grads(layer: jbp.Dense, a: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
    grads = {"w": a.T @ delta}
    if layer.bias:
        grads["b"] = jnp.sum(delta, axis=0)
    return grads


@dataclasses.dataclass(frozen=True)
class SkipsFPrime(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, _z, _out = cache
        delta = delta_out  # BUG: δ = ∂C/∂out, the ⊙ f'(z) forgotten
        return _grads(self, a, delta), delta @ params["w"].T


@dataclasses.dataclass(frozen=True)
class MissingTranspose(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        return _grads(self, a, delta), delta @ params["w"]  # BUG: w, not wᵀ (square w)


@dataclasses.dataclass(frozen=True)
class PassesDeltaThrough(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        return _grads(self, a, delta), delta_out  # BUG: the layer's own ∂out/∂a dropped


@dataclasses.dataclass(frozen=True)
class DeltaInSkipsFPrime(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        return _grads(self, a, delta), delta_out @ params["w"].T  # BUG: δ_out, not δ


@dataclasses.dataclass(frozen=True)
class WeightGradTransposed(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        grads = _grads(self, a, delta)
        grads["w"] = delta.T @ a  # BUG: (aᵀδ)ᵀ, shape-correct only because w is square
        return grads, delta @ params["w"].T


@dataclasses.dataclass(frozen=True)
class WeightGradUsesOutput(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        grads = _grads(self, a, delta)
        grads["w"] = out.T @ delta  # BUG: a_l instead of a_{l-1}
        return grads, delta @ params["w"].T


@dataclasses.dataclass(frozen=True)
class BiasGradAveraged(jbp.Dense):
    def backward(self, params, cache, delta_out):
        a, z, out = cache
        delta = _fprime(self, z, out, delta_out)
        grads = _grads(self, a, delta)
        grads["b"] = jnp.mean(delta, axis=0)  # BUG: mean over the batch, not the sum
        return grads, delta @ params["w"].T


def _as(cls: type) -> Callable[[jbp.Dense], Any]:
    return lambda layer: cls(layer.fan_in, layer.fan_out, layer.activation, bias=layer.bias)


# --- mutant losses -----------------------------------------------------------


def _half_sse(a, y):
    return 0.5 * jnp.sum((a - y) ** 2, axis=-1)


def _mse(a, y):
    return jnp.mean((a - y) ** 2, axis=-1)


def _bce(a, y):
    return jnp.sum(jax.nn.softplus(a) - y * a, axis=-1)


def _onehot(a, y):
    return jax.nn.one_hot(y, a.shape[-1], dtype=a.dtype) if y.dtype.kind in "iu" else y


def _xent(a, y):
    return -jnp.sum(_onehot(a, y) * jax.nn.log_softmax(a, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class MeanValueSumDelta(jbp.Loss):
    """Declares ``reduction="sum"`` (so backprop does not scale δ_L by 1/B) but
    its value averages over the batch."""

    def reduce(self, per_example):
        return jnp.mean(per_example)  # BUG: δ_L misses the 1/B of this mean


MUTANT_LOSSES = {
    "mse": MeanValueSumDelta(
        "mut_mean_value_sum_delta", _mse, lambda a, y: 2 * (a - y) / a.shape[-1], "sum"
    ),
    "half_sse": jbp.Loss(
        "mut_sse_missing_half", lambda a, y: 2 * _half_sse(a, y), lambda a, y: a - y, "sum"
    ),
    "half_sse_sign": jbp.Loss("mut_delta_sign_flipped", _half_sse, lambda a, y: y - a, "sum"),
    "sigmoid_bce": jbp.Loss(
        "mut_bce_delta_through_sigmoid",
        _bce,
        # BUG: δ_L = (σ(a) − y) ⊙ σ'(a): the sigmoid's f' applied on top of the fused δ.
        lambda a, y: (jax.nn.sigmoid(a) - y) * jax.nn.sigmoid(a) * (1 - jax.nn.sigmoid(a)),
        "sum",
    ),
    "softmax_xent": jbp.Loss(
        "mut_xent_delta_of_logits",
        _xent,
        lambda a, y: a - _onehot(a, y),  # BUG: logits where softmax(logits) belongs
        "mean",
        integer_labels=True,
    ),
}


def _loss(key: str) -> Callable[[Any], Any]:
    return lambda loss: MUTANT_LOSSES[key]


# --- the mutants -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A planted bug.

    Attributes:
      name: pytest id.
      reach: which layers the bug makes wrong: ``"delta"`` (layer k's δ: every
        parameterised layer ≤ k), ``"delta_in"`` (its ∂C/∂a: every one < k),
        ``"grads"`` (its own weight or bias gradient: layer k alone) or
        ``"loss"`` (δ_L: every layer).
      activation: activation of the square Dense layer k the mutant replaces.
      layer: makes layer k's mutant from the clean layer, or None.
      loss: makes the mutant loss from the clean loss, or None.
      losses: the clean losses to draw problems with.
    """

    name: str
    reach: str
    activation: str = "tanh"
    layer: Callable[[jbp.Dense], Any] | None = None
    loss: Callable[[Any], Any] | None = None
    losses: tuple[str, ...] | None = None


MUTANTS = (
    Mutant(
        "sigmoid_f_not_fprime", "delta", "sigmoid", _with_activation("mut_sigmoid_f_not_fprime")
    ),
    Mutant(
        "sigmoid_fprime_of_output",
        "delta",
        "sigmoid",
        _with_activation("mut_sigmoid_fprime_of_output"),
    ),
    Mutant("tanh_fprime_of_z", "delta", "tanh", _with_activation("mut_tanh_fprime_of_z")),
    Mutant("skips_fprime", "delta", layer=_as(SkipsFPrime)),
    Mutant("missing_transpose", "delta_in", layer=_as(MissingTranspose)),
    Mutant("passes_delta_through", "delta_in", layer=_as(PassesDeltaThrough)),
    Mutant("delta_in_skips_fprime", "delta_in", layer=_as(DeltaInSkipsFPrime)),
    Mutant("weight_grad_transposed", "grads", layer=_as(WeightGradTransposed)),
    Mutant("weight_grad_uses_output", "grads", layer=_as(WeightGradUsesOutput)),
    Mutant("bias_grad_averaged", "grads", layer=_as(BiasGradAveraged)),
    Mutant("loss_mean_value_sum_delta", "loss", loss=_loss("mse"), losses=("mse",)),
    Mutant("loss_sse_missing_half", "loss", loss=_loss("half_sse"), losses=("half_sse",)),
    Mutant("loss_delta_sign_flipped", "loss", loss=_loss("half_sse_sign"), losses=("half_sse",)),
    Mutant(
        "loss_bce_delta_through_sigmoid", "loss", loss=_loss("sigmoid_bce"), losses=("sigmoid_bce",)
    ),
    Mutant(
        "loss_xent_delta_of_logits", "loss", loss=_loss("softmax_xent"), losses=("softmax_xent",)
    ),
)


@st.composite
def nets_with_square_layer(draw: Any, activation: str) -> tuple[jbp.Sequential, int]:
    """A random network with a square ``Dense(w, w, activation, bias=True)``,
    ``w >= 2``, inserted right after one of its Dense layers; returns it and
    the inserted layer's index ``k`` (so a Dense layer lies below ``k``)."""
    base = draw(jt.architectures(max_depth=3, min_width=2, max_width=6, activations=LIVE))
    layers = list(base.layers)
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, jbp.Dense)]
    j = draw(st.sampled_from(dense), label="insert after layer")
    width = layers[j].fan_out
    layers.insert(j + 1, jbp.Dense(width, width, activation, bias=True))
    return jbp.Sequential(layers), j + 1


def _expected_failing(net: jbp.Sequential, k: int, reach: str) -> list[int]:
    params = [i for i, layer in enumerate(net.layers) if isinstance(layer, jbp.Dense)]
    if reach == "delta":
        return [i for i in params if i <= k]
    if reach == "delta_in":
        return [i for i in params if i < k]
    if reach == "grads":
        return [k]
    return params


_BLAMED: set[str] = set()


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
# No shrinking: a failure here means a mutant escaped, and shrinking would
# recompile two verifications per step for up to five minutes per mutant.
@settings(max_examples=_examples(4), phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data())
def test_property_check_catches_planted_bug(mutant, data):
    net, k = data.draw(nets_with_square_layer(mutant.activation), label="net")
    _, loss, params, x, y = data.draw(
        jt.problems(
            nets=net,
            losses=mutant.losses,
            dtypes=("float64",),
            min_batch=2,
            max_batch=6,
            single=False,
        ),
        label="problem",
    )
    clean = property_check(net, loss, params, x, y)
    assert clean.ok, f"the unmutated network fails, so the test would be vacuous:\n{clean}"

    mutant_net, mutant_loss = net, loss
    if mutant.layer is not None:
        layers = list(net.layers)
        layers[k] = mutant.layer(layers[k])
        mutant_net = jbp.Sequential(layers)
    if mutant.loss is not None:
        mutant_loss = mutant.loss(loss)
    report = property_check(mutant_net, mutant_loss, params, x, y)

    assert not report.ok, f"mutant {mutant.name} not caught:\n{report}"
    assert report.first_mismatch is not None
    failing = sorted({row.layer for row in report.rows if not row.ok})
    expected = _expected_failing(net, k, mutant.reach)
    assert failing == expected, f"failing layers {failing}, expected {expected}:\n{report}"
    # Backprop runs from the output, so the bug sits at the highest failing layer.
    origin = {"delta": k, "grads": k, "delta_in": max(expected), "loss": max(expected)}
    assert max(failing) == origin[mutant.reach]
    # The blame names the planted rule itself, not the first leaf that differs
    # (once per mutant: it compiles every layer's rule check).
    if mutant.name not in _BLAMED:
        _BLAMED.add(mutant.name)
        assert report.blame == ("loss" if mutant.reach == "loss" else f"layers[{k}]"), report


def test_every_mutant_kind_is_planted():
    assert {m.reach for m in MUTANTS} == {"delta", "delta_in", "grads", "loss"}
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)
