"""Activation functions with their derivatives, side by side.

Every activation is a pair ``(f, f')`` plus the rule that turns an upstream
gradient ``g = ∂C/∂out`` into ``δ = ∂C/∂z = g ⊙ f'(z)``, and, for curvature
(:func:`jbp.diag_hessian`'s residual terms ``g ⊙ f''(z)``), ``f''``. Where JAX has its own
derivative rule for the primitive we use in ``f``, the δ rule is written in the
same operation order, so that under ``jit`` the manual gradient is often bitwise
identical to JAX's own autodiff.

Users add their own with :func:`register_activation`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ._precision import is_low, widen

Array = jax.Array
_Fn = Callable[[Array], Array]
_Derivative = Callable[[Array, Array], Array]
_Delta = Callable[[Array, Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class ActivationFn:
    """An activation ``f`` with its derivative.

    Attributes:
      name: registry name.
      f: elementwise function, ``out = f(z)``.
      derivative: ``f'(z)`` as a function of ``(z, out)``; ``out = f(z)`` is
        passed so rules such as σ' = σ(1 − σ) need not recompute ``f``.
      delta: optional ``(g, z, out) -> g ⊙ f'(z)``; defaults to
        ``g * derivative(z, out)``. Give it to mirror an autodiff rule's
        operation order exactly.
      second_derivative: ``f''(z)`` as a function of ``(z, out)``, for the
        Hessian's residual terms; :data:`ZERO` for piecewise-linear
        activations (relu: the residual vanishes and is skipped); ``None``
        if unknown (curvature that needs it then raises a clear error).
    """

    name: str
    f: _Fn
    derivative: _Derivative
    delta: _Delta | None = None
    second_derivative: _Derivative | None = None

    @property
    def second_is_zero(self) -> bool:
        """Whether ``f''`` vanishes (almost) everywhere: no Hessian residual term."""
        return self.second_derivative is ZERO

    def second(self, z: Array, out: Array) -> Array:
        """``f''(z)``, or a clear error if the activation was registered without it."""
        if self.second_derivative is None:
            raise ValueError(
                f"activation {self.name!r} has no second derivative: register it with "
                "second_derivative=(z, out) -> f''(z) (or jbp.ZERO for a piecewise-linear "
                "one) to use jbp.diag_hessian"
            )
        return self.second_derivative(z, out)

    def apply(self, z: Array) -> Array:
        """``f(z)``; for low-precision ``z`` (bfloat16, float16) computed in float32 and
        rounded once to ``z``'s dtype (mixed precision, see :mod:`jbp._precision`)."""
        if is_low(z.dtype):
            return self.f(z.astype(jnp.float32)).astype(z.dtype)
        return self.f(z)

    def backward(self, g: Array, z: Array, out: Array) -> Array:
        """δ = g ⊙ f'(z), where ``g`` is the gradient with respect to ``f(z)``; for a
        low-precision ``g`` computed in float32 and returned in ``g``'s dtype."""
        if is_low(g.dtype):
            wide = [widen(v) for v in (g, z, out)]
            return self.backward(*wide).astype(g.dtype)
        if self.delta is not None:
            return self.delta(g, z, out)
        return g * self.derivative(z, out)


_REGISTRY: dict[str, ActivationFn] = {}


def ZERO(z: Array, out: Array) -> Array:
    """``f'' = 0``: the second derivative of a piecewise-linear activation."""
    return jnp.zeros_like(z)


def register_activation(
    name: str,
    f: _Fn,
    derivative: _Derivative,
    *,
    delta: _Delta | None = None,
    second_derivative: _Derivative | None = None,
    overwrite: bool = False,
) -> ActivationFn:
    """Register an activation ``f`` with its hand-written derivative.

    Args:
      name: the name layers will use, e.g. ``Dense(3, 4, "my_act")``.
      f: elementwise ``z -> f(z)``.
      derivative: elementwise ``(z, out) -> f'(z)`` where ``out = f(z)``.
      delta: optional ``(g, z, out) -> g ⊙ f'(z)`` (see :class:`ActivationFn`).
      second_derivative: optional ``(z, out) -> f''(z)``, needed only by
        :func:`jbp.diag_hessian`; pass ``jbp.ZERO`` for a piecewise-linear ``f``.
      overwrite: allow replacing an existing name.

    Returns:
      The registered :class:`ActivationFn`. ``jbp.verify`` checks it against
      autodiff like any built-in one.

    Example:
      >>> import jax.numpy as jnp, jbp
      >>> _ = jbp.register_activation(
      ...     "cube", lambda z: z**3, lambda z, out: 3 * z**2, overwrite=True)
      >>> jbp.Dense(2, 3, "cube").activation
      'cube'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {name!r}")
    if not callable(f) or not callable(derivative):
        raise TypeError("`f` and `derivative` must be callables")
    if second_derivative is not None and not callable(second_derivative):
        raise TypeError(
            f"`second_derivative` must be a callable (z, out) -> f''(z), jbp.ZERO or None, "
            f"got {second_derivative!r}"
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"activation {name!r} is already registered; pass overwrite=True to replace it"
        )
    act = ActivationFn(name, f, derivative, delta, second_derivative)
    _REGISTRY[name] = act
    return act


def get_activation(name: str) -> ActivationFn:
    """Look an activation up by name, with an error listing the known ones."""
    if isinstance(name, ActivationFn):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown activation {name!r}; known activations: {known}") from None


def activation_names() -> tuple[str, ...]:
    """The names of all registered activations, sorted."""
    return tuple(sorted(_REGISTRY))


# --- built-ins -------------------------------------------------------------


def _identity_delta(g: Array, z: Array, out: Array) -> Array:
    return g


register_activation(
    "identity",
    lambda z: z,
    lambda z, out: jnp.ones_like(z),
    delta=_identity_delta,
    second_derivative=ZERO,
)

# σ' = σ(1 − σ); JAX's rule for lax.logistic: g * (ans * (1 - ans)).
register_activation(
    "sigmoid",
    jax.nn.sigmoid,
    lambda z, out: out * (1 - out),
    delta=lambda g, z, out: g * (out * (1 - out)),
    second_derivative=lambda z, out: out * (1 - out) * (1 - 2 * out),
)


# tanh' = 1 − tanh². JAX's rule for lax.tanh is (g + g·ans)(1 − ans) in forward
# mode; reverse-mode autodiff runs its transpose, t + t·ans with t = g(1 − ans): mirrored here.
def _tanh_delta(g: Array, z: Array, out: Array) -> Array:
    t = g * (1 - out)
    return t + t * out


register_activation(
    "tanh",
    jnp.tanh,
    lambda z, out: 1 - out * out,
    delta=_tanh_delta,
    second_derivative=lambda z, out: -2 * out * (1 - out * out),
)

# relu' = 1[z > 0] (0 at the kink, as jax.nn.relu).
register_activation(
    "relu",
    jax.nn.relu,
    lambda z, out: (z > 0).astype(z.dtype),
    delta=lambda g, z, out: lax.select(z > 0, g, jnp.zeros_like(g)),
    second_derivative=ZERO,
)

_LEAKY_SLOPE = 0.01


def _leaky_relu(z: Array) -> Array:
    return jnp.where(z >= 0, z, _LEAKY_SLOPE * z)


register_activation(
    "leaky_relu",
    _leaky_relu,
    lambda z, out: jnp.where(z >= 0, jnp.ones_like(z), jnp.full_like(z, _LEAKY_SLOPE)),
    delta=lambda g, z, out: jnp.where(z >= 0, g, _LEAKY_SLOPE * g),
    second_derivative=ZERO,
)


def _elu(z: Array) -> Array:
    return jnp.where(z > 0, z, jnp.expm1(jnp.where(z > 0, jnp.zeros_like(z), z)))


# elu'(z) = 1 for z > 0, exp(z) = elu(z) + 1 otherwise.
register_activation(
    "elu",
    _elu,
    lambda z, out: jnp.where(z > 0, jnp.ones_like(z), out + 1),
    delta=lambda g, z, out: jnp.where(z > 0, g, g * (out + 1)),
    second_derivative=lambda z, out: jnp.where(z > 0, jnp.zeros_like(z), out + 1),
)


# softplus(z) = log(1 + e^z) in the stable form (jnp.logaddexp(z, 0)); softplus' = σ(z),
# which logaddexp's rule forms as exp(z − softplus(z)) (infinities masked): mirrored.
def _softplus_delta(g: Array, z: Array, out: Array) -> Array:
    zero = jnp.zeros_like(z)
    return g * jnp.exp(jnp.where(z == jnp.inf, zero, z) - jnp.where(out == jnp.inf, zero, out))


def _sigmoid_slope(z: Array, out: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return s * (1 - s)


register_activation(
    "softplus",
    jax.nn.softplus,
    lambda z, out: jax.nn.sigmoid(z),
    delta=_softplus_delta,
    second_derivative=_sigmoid_slope,
)

_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _gelu(z: Array) -> Array:
    return 0.5 * z * (1 + lax.erf(z * _INV_SQRT2))


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


# gelu'(z) = Φ(z) + z φ(z); the δ in the order of autodiff's transposed chain
# (product rule on 0.5·z·(1 + erf(z/√2)), erf' = 2/√π·exp(−u²)).
def _gelu_delta(g: Array, z: Array, out: Array) -> Array:
    u = z * _INV_SQRT2
    through_erf = _TWO_OVER_SQRT_PI * ((0.5 * z) * g) * jnp.exp(-jnp.square(u)) * _INV_SQRT2
    return through_erf + 0.5 * (g * (1 + lax.erf(u)))


register_activation(
    "gelu",
    _gelu,
    lambda z, out: (
        0.5 * (1 + lax.erf(z * _INV_SQRT2)) + z * (_INV_SQRT_2PI * jnp.exp(-0.5 * z * z))
    ),
    delta=_gelu_delta,
    # gelu'' = 2φ(z) + z φ'(z) = φ(z)(2 − z²)
    second_derivative=lambda z, out: _INV_SQRT_2PI * jnp.exp(-0.5 * z * z) * (2 - z * z),
)

_GELU_C = math.sqrt(2 / math.pi)
_GELU_K = 0.044715


def _gelu_tanh(z: Array) -> Array:
    return 0.5 * z * (1 + jnp.tanh(_GELU_C * (z + _GELU_K * z**3)))


def _gelu_tanh_derivative(z: Array, out: Array) -> Array:
    t = jnp.tanh(_GELU_C * (z + _GELU_K * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_K * z * z)


# The δ in the order of autodiff's transposed chain through 0.5·z·(1 + tanh(c(z + k z³))).
def _gelu_tanh_delta(g: Array, z: Array, out: Array) -> Array:
    t = jnp.tanh(_GELU_C * (z + _GELU_K * z**3))
    s = ((0.5 * z) * g) * (1 - t)
    r = _GELU_C * (s + s * t)
    return (r + (_GELU_K * r) * (3 * z**2)) + 0.5 * (g * (1 + t))


# With t = tanh(u), u = c(z + k z³): f'' = (1 − t²)(u' + ½ z (u'' − 2 t u'²)).
def _gelu_tanh_second(z: Array, out: Array) -> Array:
    t = jnp.tanh(_GELU_C * (z + _GELU_K * z**3))
    du = _GELU_C * (1 + 3 * _GELU_K * z * z)
    ddu = 6 * _GELU_C * _GELU_K * z
    return (1 - t * t) * (du + 0.5 * z * (ddu - 2 * t * du * du))


register_activation(
    "gelu_tanh",
    _gelu_tanh,
    _gelu_tanh_derivative,
    delta=_gelu_tanh_delta,
    second_derivative=_gelu_tanh_second,
)


def _silu(z: Array) -> Array:
    return z * jax.nn.sigmoid(z)


# silu'(z) = σ(z) (1 + z (1 − σ(z))).
def _silu_derivative(z: Array, out: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


# The δ in the order of autodiff's product rule on z·σ(z), σ' = σ(1 − σ).
def _silu_delta(g: Array, z: Array, out: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return g * s + (z * g) * (s * (1 - s))


# silu'' = σ(1 − σ)(2 + z(1 − 2σ)).
def _silu_second(z: Array, out: Array) -> Array:
    s = jax.nn.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


register_activation(
    "silu", _silu, _silu_derivative, delta=_silu_delta, second_derivative=_silu_second
)
register_activation(
    "sin", jnp.sin, lambda z, out: jnp.cos(z), second_derivative=lambda z, out: -jnp.sin(z)
)
