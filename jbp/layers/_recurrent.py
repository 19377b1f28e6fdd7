"""Recurrent layers: one cell step, and backpropagation through time written out.

A recurrent layer runs a cell over ``(batch, T, features)`` by ``lax.scan``,
from a zero initial state. Every cell here (and any cell a user writes) has the
same two weight matrices and one nonlinear, parameter-free step:

    gi_t = x_t wi (+ b or bi)          all T steps at once, before the scan
    gh_t = h_{t-1} wh (+ bh)           inside the scan
    state_t, cache_t = cell.step(gi_t, gh_t, state_{t-1})

The state is a tuple of ``(batch, hidden)`` arrays whose first entry is the
output ``h`` (``(h,)`` for RNN and GRU, ``(h, c)`` for LSTM).

**Backpropagation through time** is the reverse scan of the δ recursion. With
``Δ_t`` the δ of the state after step t (from the output δ at t plus what flows
back from step t + 1), the cell's ``step_backward`` gives the δs of its two
pre-activations and of the previous state along the direct path (the LSTM's
cell state, the GRU's ``z ⊙ h``); the recurrent path adds ``δgh_t whᵀ``:

    δgi_t, δgh_t, direct = cell.step_backward(cache_t, Δ_t)
    Δ_{t-1} = direct + (δgh_t whᵀ, 0, ...) + (δout_{t-1}, 0, ...)

after the scan, ``∂C/∂x = δgi wiᵀ`` and the weights' gradients are sums over
time of outer products, ``∂C/∂wi = Σ_{i,t} x_it ⊗ δgi_it``, ``∂C/∂wh = Σ_{i,t}
h_i,t−1 ⊗ δgh_it``, ``∂C/∂b = Σ_{i,t} δgi_it``: the :class:`Outer` and
:class:`Elementwise` factors every per-example quantity is formed from, with
time as the position axis (the norms choose between the Gram form over time
steps and materialising per example by flop count, as for any outer factor).

**Padding.** With a padding mask (``(batch, T)``, right padding) a padded step
leaves the state as it is (``state_t = state_{t-1}``), so the last state is
each example's own last real step; its output (``return_sequences=True``) is 0.
Backward, a padded step passes Δ through unchanged and gives its δgi, δgh zero:
padded steps contribute exactly nothing to any gradient or per-example quantity.
Inputs at padded steps are replaced by 0 before anything reads them.

**Tangents** (for :func:`jbp.ggn_vector_product`): a forward scan of the
linearised cell, ``cell.step_tangent``.

A new cell: subclass :class:`Cell`, give ``gates`` (the width of each
projection), ``step``, ``step_backward`` and, for ``ggn_vector_product``,
``step_tangent``; wrap it in :class:`Recurrent`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jax import lax

from .._activations import get_activation
from .._checks import check_dtype, check_key
from .._precision import is_low
from ._base import (
    NO_CONTEXT,
    Context,
    Layer,
    Params,
    Shape,
    ShapeError,
    last_axis,
    positive_int,
)
from ._dense import contract_leading
from ._factors import Elementwise, Factorised, Outer

Array = jax.Array
State = tuple[Array, ...]


def _sigmoid_slope(s: Array) -> Array:
    return s * (1 - s)


def _tanh_slope(t: Array) -> Array:
    return 1 - t * t


class Cell:
    """One step of a recurrent layer (subclass it for a new cell; see the module docs).

    A cell has ``features`` (the width of ``x_t``), ``hidden`` (of ``h``), and:

    - ``gates``: the width K of both projections ``gi = x wi (+ b)``,
      ``gh = h wh (+ bh)``: params ``wi (features, K)``, ``wh (hidden, K)``;
    - ``biases``: ``("b",)`` (one bias, added to ``gi``), ``("bi", "bh")``
      (one per projection, as GRU needs) or ``()`` (none), each ``(K,)``;
    - ``state_parts``: the number of ``(batch, hidden)`` arrays in the state
      (its first is the output ``h``);
    - ``step(gi, gh, state) -> (state', cache)``: ``gi``, ``gh`` are ``(batch, K)``;
    - ``step_backward(cache, d_state') -> (d_gi, d_gh, d_state)``: the δs of
      ``gi`` and ``gh`` (``d_gh=None``: the same as ``d_gi``, as when the cell
      only uses ``gi + gh``) and of the previous state along every path but
      ``gh`` (a tuple like the state; None entries are zero);
    - ``step_tangent(cache, gi_dot, gh_dot, state_dot) -> state'_dot`` (optional).

    ``init`` draws every leaf from U(−1/√hidden, 1/√hidden) (PyTorch's default).
    """

    features: int
    hidden: int
    biases: tuple[str, ...] = ("b",)
    state_parts: int = 1

    @property
    def gates(self) -> int:
        raise NotImplementedError

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        dtype = check_dtype(dtype)
        check_key(key)
        bound = 1.0 / math.sqrt(self.hidden)
        shapes: dict[str, tuple[int, ...]] = {
            "wi": (self.features, self.gates),
            "wh": (self.hidden, self.gates),
        }
        shapes.update({name: (self.gates,) for name in self.biases})
        keys = jr.split(key, len(shapes))
        return {
            name: jr.uniform(k, shape, dtype, -bound, bound)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }

    def step(self, gi: Array, gh: Array, state: State) -> tuple[State, Any]:
        raise NotImplementedError

    def step_backward(self, cache: Any, d_state: State) -> tuple[Array, Array | None, tuple]:
        raise NotImplementedError


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class RNNCell(Cell):
    """Elman cell: ``h' = f(gi + gh)``, ``gi = x wi + b``, ``gh = h wh``.

    δ rule: ``δz = Δh' ⊙ f'(z)``; ``δgi = δgh = δz``; no direct path to ``h``.
    """

    features: int
    hidden: int
    activation: str = "tanh"

    @property
    def gates(self) -> int:
        return self.hidden

    def step(self, gi: Array, gh: Array, state: State) -> tuple[State, Any]:
        z = gi + gh
        h = get_activation(self.activation).f(z)
        return (h,), (z, h)

    def step_backward(self, cache: Any, d_state: State) -> tuple[Array, None, tuple]:
        z, h = cache
        return get_activation(self.activation).backward(d_state[0], z, h), None, (None,)

    def step_tangent(self, cache: Any, gi_dot: Array, gh_dot: Array, state_dot: State) -> State:
        z, h = cache
        return ((gi_dot + gh_dot) * get_activation(self.activation).derivative(z, h),)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class LSTMCell(Cell):
    """LSTM cell, gate blocks in the order i, f, g, o (pinned):
    ``z = gi + gh``; ``i, f, o = σ(z_i), σ(z_f), σ(z_o)``; ``g = tanh(z_g)``;
    ``c' = f ⊙ c + i ⊙ g``; ``h' = o ⊙ tanh(c')``.

    δ rule (Δh', Δc' the δs of the new state): ``δc = Δc' + Δh' ⊙ o ⊙ (1 − tanh²c')``;
    ``δz_i = δc ⊙ g ⊙ σ'``, ``δz_f = δc ⊙ c ⊙ σ'`` (the *previous* cell state),
    ``δz_g = δc ⊙ i ⊙ (1 − g²)``, ``δz_o = Δh' ⊙ tanh c' ⊙ σ'``; ``δgi = δgh = δz``;
    direct paths ``Δh ← 0``, ``Δc ← δc ⊙ f``.
    """

    features: int
    hidden: int
    state_parts = 2

    @property
    def gates(self) -> int:
        return 4 * self.hidden

    def step(self, gi: Array, gh: Array, state: State) -> tuple[State, Any]:
        _, c = state
        zi, zf, zg, zo = jnp.split(gi + gh, 4, axis=-1)
        i, f, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jax.nn.sigmoid(zo)
        g = jnp.tanh(zg)
        c_new = f * c + i * g
        tc = jnp.tanh(c_new)
        return (o * tc, c_new), (i, f, g, o, c, tc)

    def step_backward(self, cache: Any, d_state: State) -> tuple[Array, None, tuple]:
        i, f, g, o, c, tc = cache
        dh, dc_next = d_state
        dc = dh * o * _tanh_slope(tc)
        if dc_next is not None:
            dc = dc + dc_next
        dz = jnp.concatenate(
            [
                dc * g * _sigmoid_slope(i),
                dc * c * _sigmoid_slope(f),
                dc * i * _tanh_slope(g),
                dh * tc * _sigmoid_slope(o),
            ],
            axis=-1,
        )
        return dz, None, (None, dc * f)

    def step_tangent(self, cache: Any, gi_dot: Array, gh_dot: Array, state_dot: State) -> State:
        i, f, g, o, c, tc = cache
        _, c_dot = state_dot
        zi, zf, zg, zo = jnp.split(gi_dot + gh_dot, 4, axis=-1)
        i_dot, f_dot, o_dot = zi * _sigmoid_slope(i), zf * _sigmoid_slope(f), zo * _sigmoid_slope(o)
        g_dot = zg * _tanh_slope(g)
        c_new_dot = f_dot * c + f * c_dot + i_dot * g + i * g_dot
        return (o_dot * tc + o * _tanh_slope(tc) * c_new_dot, c_new_dot)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class GRUCell(Cell):
    """GRU cell (PyTorch's form), gate blocks in the order r, z, n (pinned):
    ``r = σ(gi_r + gh_r)``, ``z = σ(gi_z + gh_z)``, ``n = tanh(gi_n + r ⊙ gh_n)``,
    ``h' = (1 − z) ⊙ n + z ⊙ h``; ``gi = x wi + bi``, ``gh = h wh + bh``.

    δ rule: ``δn = Δh' ⊙ (1 − z) ⊙ (1 − n²)``; ``δr = δn ⊙ gh_n ⊙ σ'(r)``;
    ``δz = Δh' ⊙ (h − n) ⊙ σ'(z)``; ``δgi = (δr, δz, δn)``, ``δgh = (δr, δz,
    δn ⊙ r)`` (the reset gate applied after the recurrent product); direct path
    ``Δh ← Δh' ⊙ z``.
    """

    features: int
    hidden: int
    biases = ("bi", "bh")

    @property
    def gates(self) -> int:
        return 3 * self.hidden

    def step(self, gi: Array, gh: Array, state: State) -> tuple[State, Any]:
        (h,) = state
        ir, iz, in_ = jnp.split(gi, 3, axis=-1)
        hr, hz, hn = jnp.split(gh, 3, axis=-1)
        r, z = jax.nn.sigmoid(ir + hr), jax.nn.sigmoid(iz + hz)
        n = jnp.tanh(in_ + r * hn)
        return ((1 - z) * n + z * h,), (r, z, n, hn, h)

    def step_backward(self, cache: Any, d_state: State) -> tuple[Array, Array, tuple]:
        r, z, n, hn, h = cache
        (dh,) = d_state
        dn = dh * (1 - z) * _tanh_slope(n)
        dr = dn * hn * _sigmoid_slope(r)
        dz = dh * (h - n) * _sigmoid_slope(z)
        d_gi = jnp.concatenate([dr, dz, dn], axis=-1)
        d_gh = jnp.concatenate([dr, dz, dn * r], axis=-1)
        return d_gi, d_gh, (dh * z,)

    def step_tangent(self, cache: Any, gi_dot: Array, gh_dot: Array, state_dot: State) -> State:
        r, z, n, hn, h = cache
        (h_dot,) = state_dot
        ir, iz, in_ = jnp.split(gi_dot, 3, axis=-1)
        hr, hz, hn_dot = jnp.split(gh_dot, 3, axis=-1)
        r_dot = (ir + hr) * _sigmoid_slope(r)
        z_dot = (iz + hz) * _sigmoid_slope(z)
        n_dot = (in_ + r_dot * hn + r * hn_dot) * _tanh_slope(n)
        return (z_dot * (h - n) + (1 - z) * n_dot + z * h_dot,)


def _time_major(x: Any) -> Any:
    return jtu.tree_map(lambda v: jnp.swapaxes(v, 0, 1), x)


def _select(m: Array | None, new: Any, old: Any) -> Any:
    """``new`` at real steps (``m`` ``(batch,)``), ``old`` at padded ones."""
    if m is None:
        return new
    return jtu.tree_map(lambda n, o: jnp.where(m[:, None], n, o), new, old)


def _zero_state(cell: Any, batch: int, dtype: Any) -> State:
    return tuple(jnp.zeros((batch, cell.hidden), dtype) for _ in range(cell.state_parts))


def _steps(mask: Array | None) -> Array | None:
    """The padding mask time-major, ``(T, batch)``, as the scans take it."""
    return None if mask is None else jnp.swapaxes(mask, 0, 1)


def _zero_where(m: Array | None, x: Array) -> Array:
    return x if m is None else jnp.where(m[..., None], x, jnp.zeros_like(x))


class RecurrentBase(Factorised, Layer):
    """What every recurrent layer shares: the forward scan, BPTT, factors, tangent.

    Subclasses give ``cell`` (a :class:`Cell`) and ``return_sequences``.
    Shapes: ``x`` ``(batch, T, features)`` → ``(batch, T, hidden)`` with
    ``return_sequences=True``, else ``(batch, hidden)`` (the last real step's state).
    """

    takes_context = True
    in_rank = 2
    cell: Any
    return_sequences: bool

    @property
    def keeps_rank(self) -> bool:  # type: ignore[override]
        return bool(self.return_sequences)

    @property
    def fan_in(self) -> int:
        """Input features (the last axis), checked against the layer before when a
        :class:`Sequential` is built."""
        return int(self.cell.features)

    @property
    def fan_out(self) -> int:
        """Output features (the last axis): ``hidden``."""
        return int(self.cell.hidden)

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        return self.cell.init(key, dtype)

    def output_shape(self, in_shape: Shape) -> Shape:
        cell = self.cell
        if len(in_shape) != 2 or in_shape[-1] != cell.features:
            raise ShapeError(
                self,
                f"expects sequences (T, features={cell.features}) per example, got input "
                f"shape {tuple(in_shape)}",
            )
        return (in_shape[0], cell.hidden) if self.return_sequences else (cell.hidden,)

    # --- forward ---------------------------------------------------------------

    def _gi(self, params: Params, x: Array) -> Array:
        gi = jnp.matmul(x, params["wi"])
        bias = params.get("b", params.get("bi"))
        return gi if bias is None else gi + last_axis(bias, gi.ndim)

    def _gh(self, params: Params, h: Array) -> Array:
        gh = jnp.matmul(h, params["wh"])
        return gh + last_axis(params["bh"], gh.ndim) if "bh" in params else gh

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        cell = self.cell
        mask = context.mask
        if a.ndim != 3:
            raise ShapeError(self, f"expects (batch, T, features), got shape {a.shape}")
        if is_low(a.dtype) and a.dtype != params["wi"].dtype:
            raise TypeError(
                f"{self!r} has no mixed precision: it got {a.dtype.name} activations with "
                f"{params['wi'].dtype.name} params; put jbp.Cast('float32') before it (or "
                "give it params of the activations' dtype)"
            )
        x = _zero_where(mask, a)
        state0 = _zero_state(cell, x.shape[0], x.dtype)
        gi = _time_major(self._gi(params, x))

        def body(state: State, step: Any) -> tuple[State, Any]:
            gi_t, m_t = step
            new, cache = cell.step(gi_t, self._gh(params, state[0]), state)
            new = _select(m_t, new, state)
            return new, (cache, new[0])

        final, (caches, hs) = lax.scan(body, state0, (gi, _steps(mask)))
        hs = jnp.swapaxes(hs, 0, 1)  # (batch, T, hidden): the state after each step
        h_prev = jnp.concatenate([state0[0][:, None], hs[:, :-1]], axis=1)
        if self.return_sequences:
            out = _zero_where(mask, hs)
        else:
            out = final[0]
        return out, (x, h_prev, caches, mask)

    # --- backward through time -------------------------------------------------

    def _back_step(self, params: Params, d_state: State, step: Any) -> tuple[State, Any]:
        """One step of the reverse scan: Δ_t (carried from t + 1, plus the output δ at
        t) → (Δ_{t-1}, (δgi_t, δgh_t or None when it is δgi_t)); a padded step passes
        Δ through."""
        cache, m_t, d_out_t = step
        if d_out_t is not None:
            d_state = (d_state[0] + d_out_t, *d_state[1:])
        d_gi, d_gh, direct = self.cell.step_backward(cache, d_state)
        same = d_gh is None  # the cell uses gi + gh only: one δ for both (stored once)
        d_gh = d_gi if same else d_gh
        recurrent = lax.dot_general(d_gh, params["wh"], (((1,), (1,)), ((), ())))
        first = recurrent if direct[0] is None else direct[0] + recurrent
        rest = tuple(
            jnp.zeros_like(d) if p is None else p
            for p, d in zip(direct[1:], d_state[1:], strict=True)
        )
        d_prev = _select(m_t, (first, *rest), d_state)
        if m_t is not None:
            d_gi = jnp.where(m_t[:, None], d_gi, jnp.zeros_like(d_gi))
            d_gh = jnp.where(m_t[:, None], d_gh, jnp.zeros_like(d_gh))
        return d_prev, (d_gi, None if same else d_gh)

    def _deltas(self, params: Params, cache: Any, delta_out: Array) -> tuple[Array, Array]:
        """BPTT: ``(δgi, δgh)``, each ``(batch, T, gates)``."""
        cell = self.cell
        x, _, caches, mask = cache
        d_last = _zero_state(cell, x.shape[0], delta_out.dtype)
        d_out = None
        if self.return_sequences:  # a δ at every step, else only at the last state
            d_out = _time_major(_zero_where(mask, delta_out))
        else:
            d_last = (delta_out, *d_last[1:])
        _, (d_gi, d_gh) = lax.scan(
            lambda d, step: self._back_step(params, d, step),
            d_last,
            (caches, _steps(mask), d_out),
            reverse=True,
        )
        d_gi = jnp.swapaxes(d_gi, 0, 1)
        return d_gi, (d_gi if d_gh is None else jnp.swapaxes(d_gh, 0, 1))

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        x, h_prev = cache[0], cache[1]
        d_gi, d_gh = self._deltas(params, cache, delta_out)
        grads = {
            "wi": lax.dot_general(x, d_gi, contract_leading(3)),
            "wh": lax.dot_general(h_prev, d_gh, contract_leading(3)),
        }
        for name, d in (("b", d_gi), ("bi", d_gi), ("bh", d_gh)):
            if name in params:
                grads[name] = jnp.sum(d, axis=(0, 1))
        delta_in = lax.dot_general(d_gi, params["wi"], (((2,), (1,)), ((), ())))
        mask = cache[3]
        return grads, _zero_where(mask, delta_in)

    def grad_factors(self, params: Params, cache: Any, delta_out: Array) -> Params:
        """Time is the position axis: ``wi``: ``Outer(x, δgi)``, ``wh``: ``Outer(h_{t-1},
        δgh)``, biases ``Elementwise(None, δgi or δgh)``."""
        cell = self.cell
        x, h_prev = cache[0], cache[1]
        d_gi, d_gh = self._deltas(params, cache, delta_out)
        b, k = x.shape[0], cell.gates
        gi4, gh4 = d_gi.reshape(b, -1, 1, k), d_gh.reshape(b, -1, 1, k)
        factors: dict[str, Any] = {
            "wi": Outer(x[:, :, None], gi4, (cell.features, k)),
            "wh": Outer(h_prev[:, :, None], gh4, (cell.hidden, k)),
        }
        for name, d in (("b", d_gi), ("bi", d_gi), ("bh", d_gh)):
            if name in params:
                factors[name] = Elementwise(None, d, (k,))
        return factors

    # --- tangent: the forward scan of the linearised cell ---------------------

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        """``(∂out/∂x)·a_dot + (∂out/∂θ)·params_dot`` by a forward scan of
        ``cell.step_tangent`` from a zero state tangent."""
        if a_dot is None and params_dot is None:
            return None
        cell = self.cell
        if not callable(getattr(cell, "step_tangent", None)):
            raise TypeError(
                f"cell {cell!r} has no step_tangent(cache, gi_dot, gh_dot, state_dot): "
                "ggn_vector_product needs one"
            )
        x, h_prev, caches, mask = cache
        batch, steps = x.shape[0], x.shape[1]
        gi_dot = jnp.zeros((batch, steps, cell.gates), x.dtype)
        gh_extra = jnp.zeros_like(gi_dot)
        if a_dot is not None:
            gi_dot = gi_dot + jnp.matmul(_zero_where(mask, a_dot), params["wi"])
        if params_dot is not None:
            gi_dot = gi_dot + self._gi(params_dot, x)
            gh_extra = gh_extra + self._gh(params_dot, h_prev)

        def body(state_dot: State, step: Any) -> tuple[State, Array]:
            cache_t, gi_t, extra_t, m_t = step
            gh_t = jnp.matmul(state_dot[0], params["wh"]) + extra_t
            new = _select(m_t, cell.step_tangent(cache_t, gi_t, gh_t, state_dot), state_dot)
            return new, new[0]

        final, hs = lax.scan(
            body,
            _zero_state(cell, batch, x.dtype),
            (caches, _time_major(gi_dot), _time_major(gh_extra), _steps(mask)),
        )
        if self.return_sequences:
            return _zero_where(mask, jnp.swapaxes(hs, 0, 1))
        return final[0]


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Recurrent(RecurrentBase):
    """A recurrent layer of any :class:`Cell` (BPTT, per-example factors, tangent).

    Args:
      cell: the cell (``cell.features``, ``cell.hidden``, its step and δ rule).
      return_sequences: every step's ``h`` ``(batch, T, hidden)`` (True) or the
        last real step's ``(batch, hidden)`` (False, the default).
    """

    cell: Any
    return_sequences: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        for m in ("step", "step_backward", "init"):
            if not callable(getattr(self.cell, m, None)):
                raise TypeError(f"`cell` ({self.cell!r}) has no {m}(...): see jbp.Cell")
        for name in ("features", "hidden", "gates"):
            positive_int(getattr(self.cell, name, None), f"cell.{name}")


class _BuiltIn(RecurrentBase):
    """RNN, LSTM and GRU: ``features`` and ``hidden`` checked, the cell built from them."""

    features: int
    hidden: int
    _cell: Any = None  # the cell class

    def __post_init__(self) -> None:
        positive_int(self.features, "features")
        positive_int(self.hidden, "hidden")

    @property
    def cell(self) -> Any:
        return self._cell(self.features, self.hidden)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class RNN(_BuiltIn):
    """Elman RNN: ``h' = f(x_t wi + h wh + b)`` over ``(batch, T, features)``.

    Params: ``wi (features, hidden)``, ``wh (hidden, hidden)``, ``b (hidden,)``.
    Output: ``(batch, T, hidden)`` with ``return_sequences=True``, else the last
    real step's ``h`` ``(batch, hidden)``. See :class:`RNNCell` for the δ rule.
    """

    features: int
    hidden: int
    activation: str = "tanh"
    return_sequences: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        get_activation(self.activation)

    @property
    def cell(self) -> RNNCell:
        return RNNCell(self.features, self.hidden, self.activation)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class LSTM(_BuiltIn):
    """LSTM over ``(batch, T, features)``; gate blocks i, f, g, o.

    Params: ``wi (features, 4·hidden)``, ``wh (hidden, 4·hidden)``, ``b (4·hidden,)``.
    State ``(h, c)``, both zero at the start. See :class:`LSTMCell` for the δ rule.
    """

    features: int
    hidden: int
    return_sequences: bool = dataclasses.field(default=False, kw_only=True)
    _cell = LSTMCell


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class GRU(_BuiltIn):
    """GRU over ``(batch, T, features)`` (PyTorch's form); gate blocks r, z, n.

    Params: ``wi (features, 3·hidden)``, ``wh (hidden, 3·hidden)``, ``bi``, ``bh``
    ``(3·hidden,)``. See :class:`GRUCell` for the δ rule.
    """

    features: int
    hidden: int
    return_sequences: bool = dataclasses.field(default=False, kw_only=True)
    _cell = GRUCell


# --- time reversal, for bidirectional networks ----------------------------------


def _reversal(mask: Array | None, steps: int) -> Array | None:
    """Indices ``(batch, T)`` that reverse each row within its own length (pads stay)."""
    if mask is None:
        return None
    t = jnp.arange(steps)[None]
    n = jnp.sum(mask, axis=1, dtype=jnp.int32)[:, None]
    return jnp.where(t < n, n - 1 - t, t)


def _permute(a: Array, idx: Array | None) -> Array:
    if idx is None:
        return jnp.flip(a, axis=1)
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class Reverse(Layer):
    """Reverse sequences in time, each within its own length under a padding mask.

    ``out[i, t] = a[i, n_i − 1 − t]`` for ``t < n_i`` (``n_i`` the real length,
    ``T`` without a mask); padded positions stay where they are. A permutation
    that is its own inverse, so its δ rule is the same reversal of ``δ_out``.
    Shapes: ``(batch, T, ...)`` → the same; params ``{}``.
    """

    takes_context = True
    keeps_width = True

    def init(self, key: Array, dtype: Any = jnp.float32) -> Params:
        check_dtype(dtype)
        return {}

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) < 1:
            raise ShapeError(self, f"expects sequences (T, ...) per example, got {in_shape}")
        return tuple(in_shape)

    def forward(self, params: Params, a: Array, context: Context = NO_CONTEXT) -> tuple[Array, Any]:
        idx = _reversal(context.mask, a.shape[1])
        return _permute(a, idx), idx

    def backward(self, params: Params, cache: Any, delta_out: Array) -> tuple[Params, Array]:
        return {}, _permute(delta_out, cache)

    def tangent(self, params: Params, cache: Any, a_dot: Any, params_dot: Any) -> Any:
        return None if a_dot is None else _permute(a_dot, cache)


def bidirectional(forward: Any, backward: Any) -> Any:
    """``Parallel([forward, Reverse → backward (→ Reverse)], merge="concat")``: a
    bidirectional layer from two recurrent layers on the same input.

    With ``return_sequences=True`` the backward direction's outputs are reversed back,
    so position t holds both directions' states at t (``(batch, T, 2·hidden)``); without
    it, each direction's last state (``(batch, 2·hidden)``: the backward one's is at
    position 0). Both layers must agree on ``return_sequences``.
    """
    from ._combinators import Parallel, Sequential

    seq_f = getattr(forward, "return_sequences", None)
    seq_b = getattr(backward, "return_sequences", None)
    if seq_f is None or seq_b is None or seq_f != seq_b:
        raise ValueError(
            "`forward` and `backward` must be recurrent layers with the same return_sequences, "
            f"got {seq_f!r} and {seq_b!r}"
        )
    back = [Reverse(), backward] + ([Reverse()] if seq_b else [])
    return Parallel([forward, Sequential(back)], merge="concat")
