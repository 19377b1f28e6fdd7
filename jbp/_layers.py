"""Layers and the Sequential network: each layer owns its δ rule.

The layer protocol (see DESIGN.md):

- ``init(key, dtype) -> params``: a pytree, ``{}`` for parameterless layers.
- ``forward(params, a) -> (out, cache)``: ``a`` is always ``(batch, fan_in)``;
  ``cache`` holds what ``backward`` needs.
- ``backward(params, cache, delta_out) -> (grads, delta_in)``: the layer's δ
  equation. ``delta_out = ∂C/∂out``, ``delta_in = ∂C/∂a``, ``grads`` is shaped
  like ``params``.

Layers are immutable, hashable and registered as pytrees without leaves, so a
network can be passed through ``jax.jit`` as an argument or closed over.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jax import lax

from ._activations import get_activation
from ._checks import check_dtype, check_key

Array = jax.Array
Params = Any

# dot_general dimension numbers, written once: contract the batch axis
# (a.T @ delta) and contract the feature axis against w's fan_out (delta @ w.T).
_CONTRACT_BATCH = (((0,), (0,)), ((), ()))
_CONTRACT_FAN_OUT = (((1,), (1,)), ((), ()))

_HE_ACTIVATIONS = frozenset({"relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu"})


class Layer:
    """Base class for layers (optional: any object with the protocol works).

    Subclasses are frozen dataclasses implementing ``init``, ``forward`` and
    ``backward``. A layer that changes the feature count should expose
    ``fan_in`` and ``fan_out`` so that shape errors are caught before tracing.
    """

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        raise NotImplementedError

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        raise NotImplementedError

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        raise NotImplementedError


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """Fully connected layer ``out = f(a @ w + b)``.

    Args:
      fan_in: input features.
      fan_out: output features.
      activation: name of a registered activation (default ``"identity"``).
      bias: whether the layer has a bias ``b``.

    Params: ``{"w": (fan_in, fan_out), "b": (fan_out,)}`` (no ``"b"`` without
    bias). Initialisation: ``w ~ N(0, 2/fan_in)`` (He) for the relu family
    (relu, leaky_relu, elu, gelu, gelu_tanh, silu), ``w ~ N(0, 2/(fan_in +
    fan_out))`` (Glorot) otherwise; ``b = 0``.

    δ rule: ``δ = ∂C/∂out ⊙ f'(z)``; ``∂C/∂w = aᵀδ``; ``∂C/∂b = Σ_batch δ``;
    ``∂C/∂a = δ wᵀ``.
    """

    fan_in: int
    fan_out: int
    activation: str = "identity"
    bias: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        for name in ("fan_in", "fan_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        get_activation(self.activation)  # unknown names fail here, listing the known ones

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        if self.activation in _HE_ACTIVATIONS:
            std = math.sqrt(2.0 / self.fan_in)
        else:
            std = math.sqrt(2.0 / (self.fan_in + self.fan_out))
        params = {"w": std * jr.normal(key, (self.fan_in, self.fan_out), dtype)}
        if self.bias:
            params["b"] = jnp.zeros((self.fan_out,), dtype)
        return params

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        z = jnp.matmul(a, params["w"])
        if self.bias:
            z = z + params["b"][None, :]
        out = get_activation(self.activation).f(z)
        return out, (a, z, out)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a, z, out = cache
        delta = get_activation(self.activation).backward(delta_out, z, out)
        grads = {"w": lax.dot_general(a, delta, _CONTRACT_BATCH)}
        if self.bias:
            grads["b"] = jnp.sum(delta, axis=0)
        delta_in = lax.dot_general(delta, params["w"], _CONTRACT_FAN_OUT)
        return grads, delta_in

    # Per-example quantities from (a, δ), never forming g_i unless asked to.
    # Each takes the same (params, cache, delta_out) as `backward`; delta_out
    # holds the unscaled per-example ∂ℓ_i/∂out in row i.

    def per_example_grads(self, params: Params, cache: Any, delta_out: Array) -> Params:
        """g_i: ``{"w": (batch, fan_in, fan_out), "b": (batch, fan_out)}`` = a_i ⊗ δ_i, δ_i."""
        a, z, out = cache
        delta = get_activation(self.activation).backward(delta_out, z, out)
        grads = {"w": a[:, :, None] * delta[:, None, :]}
        if self.bias:
            grads["b"] = delta
        return grads

    def per_example_sq_norms(self, params: Params, cache: Any, delta_out: Array) -> Array:
        """‖g_i‖² over this layer's params, ``(batch,)``: ‖a_i‖²‖δ_i‖² (+ ‖δ_i‖² for b)."""
        a, z, out = cache
        delta = get_activation(self.activation).backward(delta_out, z, out)
        d2 = jnp.sum(delta * delta, axis=1)
        sq = jnp.sum(a * a, axis=1) * d2
        return sq + d2 if self.bias else sq

    def sum_grad_squared(self, params: Params, cache: Any, delta_out: Array) -> Params:
        """Σ_i g_i² elementwise, like params: ``(a²)ᵀ(δ²)`` and ``Σ_i δ_i²``."""
        a, z, out = cache
        delta = get_activation(self.activation).backward(delta_out, z, out)
        d2 = delta * delta
        grads = {"w": lax.dot_general(a * a, d2, _CONTRACT_BATCH)}
        if self.bias:
            grads["b"] = jnp.sum(d2, axis=0)
        return grads

    def weighted_grads(self, params: Params, cache: Any, delta_out: Array, c: Array) -> Params:
        """Σ_i c_i g_i, like params: ``aᵀ(c ⊙ δ)`` and ``Σ_i c_i δ_i``; ``c`` is ``(batch,)``."""
        a, z, out = cache
        delta = get_activation(self.activation).backward(delta_out, z, out) * c[:, None]
        grads = {"w": lax.dot_general(a, delta, _CONTRACT_BATCH)}
        if self.bias:
            grads["b"] = jnp.sum(delta, axis=0)
        return grads


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Activation(Layer):
    """A parameterless elementwise layer ``out = f(a)``.

    δ rule: ``∂C/∂a = ∂C/∂out ⊙ f'(a)``. Params are ``{}``.
    """

    name: str

    def __post_init__(self) -> None:
        get_activation(self.name)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def forward(self, params: Params, a: Array) -> tuple[Array, Any]:
        out = get_activation(self.name).f(a)
        return out, (a, out)

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        a, out = cache
        return {}, get_activation(self.name).backward(delta_out, a, out)


def _is_layer(obj: Any) -> bool:
    return all(callable(getattr(obj, m, None)) for m in ("init", "forward", "backward"))


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Sequential:
    """Layers applied in order; backward runs their δ rules in reverse.

    Args:
      layers: a non-empty sequence of layers.

    ``params`` is a tuple with one entry per layer. ``apply`` takes ``x`` of
    shape ``(batch, fan_in)`` or a single example ``(fan_in,)``.
    """

    layers: tuple[Any, ...]

    def __init__(self, layers: Sequence[Any]) -> None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"`layers` must be a sequence of layers, got {type(layers).__name__}")
        layers = tuple(layers)
        if not layers:
            raise ValueError("`layers` is empty: a network needs at least one layer")
        for i, layer in enumerate(layers):
            if not _is_layer(layer):
                raise TypeError(
                    f"`layers[{i}]` is {layer!r}, which is not a layer: a layer needs "
                    "init(key, dtype), forward(params, a) and backward(params, cache, delta_out)"
                )
            try:
                hash(layer)
            except TypeError:
                raise TypeError(
                    f"`layers[{i}]` ({type(layer).__name__}) is not hashable; make it a "
                    "frozen dataclass"
                ) from None
        width = None
        for i, layer in enumerate(layers):
            fan_in = getattr(layer, "fan_in", None)
            if fan_in is not None and width is not None and fan_in != width:
                raise ValueError(
                    f"`layers[{i}]` ({layer!r}) expects fan_in={fan_in} but the layers before "
                    f"it give {width} features"
                )
            width = getattr(layer, "fan_out", width)
        object.__setattr__(self, "layers", layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def fan_in(self) -> int | None:
        """Input features the first sized layer expects (None if unknown)."""
        for layer in self.layers:
            if getattr(layer, "fan_in", None) is not None:
                return int(layer.fan_in)
        return None

    @property
    def fan_out(self) -> int | None:
        """Output features of the last sized layer (None if unknown)."""
        for layer in reversed(self.layers):
            if getattr(layer, "fan_out", None) is not None:
                return int(layer.fan_out)
        return None

    def init(self, key: Array, dtype: Any = jnp.float32) -> tuple[Params, ...]:
        """Initial params: a tuple, one entry per layer; ``key`` split once per layer."""
        dtype = check_dtype(dtype)
        check_key(key)
        keys = jr.split(key, len(self.layers))
        return tuple(layer.init(k, dtype) for layer, k in zip(self.layers, keys, strict=True))

    def forward(self, params: Sequence[Params], a: Array) -> tuple[Array, tuple[Any, ...]]:
        """Run every layer on a ``(batch, fan_in)`` array; returns output and caches."""
        caches = []
        for layer, p in zip(self.layers, params, strict=True):
            a, cache = layer.forward(p, a)
            caches.append(cache)
        return a, tuple(caches)

    def backward(
        self, params: Sequence[Params], caches: Sequence[Any], delta_out: Array
    ) -> tuple[tuple[Params, ...], Array]:
        """Run the δ rules in reverse; returns per-layer grads and ``∂C/∂x``."""
        grads: list[Params] = [None] * len(self.layers)
        delta = delta_out
        for i in reversed(range(len(self.layers))):
            grads[i], delta = self.layers[i].backward(params[i], caches[i], delta)
        return tuple(grads), delta

    def apply(self, params: Sequence[Params], x: Array) -> Array:
        """Network output for ``x`` of shape ``(batch, fan_in)`` or ``(fan_in,)``."""
        from ._checks import check_params, check_x

        check_params(self, params)
        x, single = check_x(self, params, x)
        out, _ = self.forward(params, x)
        return out[0] if single else out


def mlp(
    sizes: Sequence[int],
    activation: str = "relu",
    *,
    final_activation: str = "identity",
    bias: bool = True,
) -> Sequential:
    """A multilayer perceptron of Dense layers (``equinox.nn.MLP``'s convention).

    Args:
      sizes: layer widths ``[fan_in, hidden..., fan_out]``, at least two.
      activation: activation of the hidden layers.
      final_activation: activation of the last layer (default ``"identity"``).
      bias: whether every layer has a bias.

    Example:
      >>> import jbp
      >>> jbp.mlp([4, 2, 2, 1], "sigmoid", final_activation="sigmoid")  # doctest: +ELLIPSIS
      Sequential(layers=(Dense(fan_in=4, fan_out=2, activation='sigmoid', bias=True), ...))
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"`sizes` needs at least two entries [fan_in, fan_out], got {sizes}")
    n = len(sizes) - 1
    return Sequential(
        [
            Dense(sizes[i], sizes[i + 1], activation if i < n - 1 else final_activation, bias=bias)
            for i in range(n)
        ]
    )
