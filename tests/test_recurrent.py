"""Recurrent networks: RNN, LSTM and GRU as pinned, BPTT against autodiff (jit, eager,
vmap over single sequences), per-example quantities against vmap(jax.grad), the
padding-invariance property, curvature, a user cell, and planted bugs, each caught."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import assume, given, settings

import jbp
import jbp.testing as jt
from jbp.layers import _recurrent

F64 = jnp.float64


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


def _close(a: Any, b: Any, rtol: float = 1e-10, names: tuple[str, str] = ("jbp", "ref")) -> None:
    jbp.compare(a, b, rtol=rtol, names=names).raise_if_failed()


def _perturbed(net: Any, seed: int = 0, scale: float = 0.3) -> Any:
    rng = np.random.default_rng(seed)
    params = net.init(jax.random.key(seed), F64)
    return jtu.tree_map(lambda a: a + scale * rng.standard_normal(a.shape), params)


def _padded(rng: np.random.Generator, lengths: list[int], t: int, features: int) -> Any:
    x = rng.standard_normal((len(lengths), t, features))
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]
    return jnp.asarray(x), jnp.asarray(mask)


def _sigmoid(z: Any) -> Any:
    return 1 / (1 + np.exp(-z))


# --- the three cells, as pinned --------------------------------------------------


def _numpy_run(kind: str, p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The pinned step equations, step by step in numpy: every step's ``h``."""
    b, t, _ = x.shape
    hidden = p["wh"].shape[0]
    h, c = np.zeros((b, hidden)), np.zeros((b, hidden))
    out = []
    for s in range(t):
        if kind == "rnn":
            h = np.tanh(x[:, s] @ p["wi"] + h @ p["wh"] + p["b"])
        elif kind == "lstm":
            z = x[:, s] @ p["wi"] + h @ p["wh"] + p["b"]
            zi, zf, zg, zo = np.split(z, 4, axis=-1)
            c = _sigmoid(zf) * c + _sigmoid(zi) * np.tanh(zg)
            h = _sigmoid(zo) * np.tanh(c)
        else:
            gi, gh = x[:, s] @ p["wi"] + p["bi"], h @ p["wh"] + p["bh"]
            r = _sigmoid(gi[:, :hidden] + gh[:, :hidden])
            z = _sigmoid(gi[:, hidden : 2 * hidden] + gh[:, hidden : 2 * hidden])
            n = np.tanh(gi[:, 2 * hidden :] + r * gh[:, 2 * hidden :])
            h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, axis=1)


@pytest.mark.parametrize(
    ("kind", "layer", "shapes"),
    [
        ("rnn", jbp.RNN(3, 4, return_sequences=True), {"wi": (3, 4), "wh": (4, 4), "b": (4,)}),
        ("lstm", jbp.LSTM(3, 4, return_sequences=True), {"wi": (3, 16), "wh": (4, 16), "b": (16,)}),
        (
            "gru",
            jbp.GRU(3, 4, return_sequences=True),
            {"wi": (3, 12), "wh": (4, 12), "bi": (12,), "bh": (12,)},
        ),
    ],
)
def test_cells_are_built_as_pinned(kind, layer, shapes):
    """Parameter layouts, gate orders, GRU's reset after the recurrent product, a zero
    initial state; the last state (return_sequences=False) is the last step's, and a
    padded sequence's is its own last real step's."""
    params = _perturbed(layer, 3)
    assert {k: v.shape for k, v in params.items()} == shapes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 3))
    want = _numpy_run(kind, {k: np.asarray(v) for k, v in params.items()}, x)
    last = dataclasses.replace(layer, return_sequences=False)
    lengths = [5, 2, 0]
    mask = jnp.asarray(np.arange(5)[None] < np.asarray(lengths)[:, None])

    @jax.jit  # the four forwards in one program; numpy from here on
    def forwards(params: Any, x: Any) -> Any:
        ctx = jbp.Context(mask=mask)
        return (
            layer.forward(params, x)[0],
            last.forward(params, x)[0],
            layer.forward(params, x, ctx)[0],
            last.forward(params, x, ctx)[0],
        )

    got, got_last, seq, end = jax.device_get(forwards(params, jnp.asarray(x)))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_last, want[:, -1], rtol=1e-12)
    for i, n in enumerate(lengths):
        assert np.all(np.asarray(seq[i, n:]) == 0)
        if n == 0:  # all padding: the zero initial state
            assert np.all(np.asarray(end[i]) == 0)
            continue
        alone = _numpy_run(kind, {k: np.asarray(v) for k, v in params.items()}, x[i : i + 1, :n])
        np.testing.assert_allclose(seq[i, :n], alone[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(end[i], alone[0, -1], rtol=1e-12, atol=1e-14)


# --- a user cell in a few lines --------------------------------------------------


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class MinimalGatedCell(jbp.Cell):
    """A minimal gated unit: ``z = σ(gi_z + gh_z)``, ``h' = (1 − z) h + z tanh(gi_n + gh_n)``."""

    features: int
    hidden: int

    @property
    def gates(self) -> int:
        return 2 * self.hidden

    def step(self, gi, gh, state):
        (h,) = state
        az, an = jnp.split(gi + gh, 2, axis=-1)
        z, n = jax.nn.sigmoid(az), jnp.tanh(an)
        return ((1 - z) * h + z * n,), (z, n, h)

    def step_backward(self, cache, d_state):
        z, n, h = cache
        (dh,) = d_state
        d_gates = jnp.concatenate([dh * (n - h) * z * (1 - z), dh * z * (1 - n * n)], axis=-1)
        return d_gates, None, (dh * (1 - z),)

    def step_tangent(self, cache, gi_dot, gh_dot, state_dot):
        z, n, h = cache
        az, an = jnp.split(gi_dot + gh_dot, 2, axis=-1)
        z_dot, n_dot = az * z * (1 - z), an * (1 - n * n)
        return (z_dot * (n - h) + (1 - z) * state_dot[0] + z * n_dot,)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class BiaslessCell(MinimalGatedCell):
    biases = ()


LAYERS = [
    jbp.RNN(3, 4, "relu", return_sequences=True),
    jbp.Recurrent(BiaslessCell(3, 2), return_sequences=True),
    jbp.LSTM(3, 4),
    jbp.GRU(3, 4, return_sequences=True),
    jbp.Recurrent(MinimalGatedCell(3, 4)),
    jbp.bidirectional(jbp.LSTM(3, 2, return_sequences=True), jbp.GRU(3, 3, return_sequences=True)),
    jbp.Sequential([jbp.Reverse(), jbp.Dense(3, 2)]),
]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda v: repr(v)[:40])
def test_check_layer_passes_on_padded_sequences(layer):
    """Backward, per-example grads, both norm forms, Σg² and re-weighted sums against
    autodiff, on a padded batch (check_layer's padded mode)."""
    report = jbp.check_layer(layer, (5, 3), padded=True, batch=4)
    assert report.ok, str(report)


def test_reverse_reverses_each_sequence_within_its_length():
    x = jnp.arange(2 * 4, dtype=F64).reshape(2, 4, 1)
    mask = jnp.asarray([[True, True, True, False], [True, True, True, True]])
    out, _ = jbp.Reverse().forward({}, x, jbp.Context(mask=mask))
    np.testing.assert_array_equal(out[..., 0], [[2, 1, 0, 3], [7, 6, 5, 4]])
    np.testing.assert_array_equal(
        jbp.Reverse().forward({}, x)[0][..., 0], [[3, 2, 1, 0], [7, 6, 5, 4]]
    )


# --- whole networks against autodiff ---------------------------------------------


@settings(max_examples=_examples(5))
@given(
    problem=jt.padded_problems(
        nets=jt.recurrents(max_depth=2, max_width=4, max_length=4),
        dtypes=("float64",),
        max_batch=3,
        padded=None,
    )
)
def test_recurrent_networks_against_autodiff(problem):
    """backprop = jax.grad (jit); vmap(backprop) over single sequences = vmap(jax.grad);
    per-example grads, norms, Σg² and clipped sums = vmap(jax.grad) over single
    sequences (each with its own mask row)."""
    net, loss, params, x, y, mask, _ = problem
    max_norm = 0.5
    objective = jbp.objective(net, loss)

    def one(p, xi, yi, mi):
        return jax.grad(objective)(p, xi, yi, mask=mi)

    fns = {
        "grad": jbp.backprop(net, loss),
        "ref": jax.grad(objective),
        "per_example_grads": jbp.per_example_grads(net, loss),
        "norms": jbp.per_example_norms(net, loss),
        "sum_grad_squared": jbp.sum_grad_squared(net, loss),
        "clipped": jbp.clipped_grad(net, loss, max_norm),
    }

    @jax.jit
    def run(p, x, y, mask):
        got = {k: f(p, x, y, mask=mask) for k, f in fns.items()}
        m = jnp.ones(x.shape[:2], bool) if mask is None else mask
        got["vmap_ref"] = jax.vmap(one, in_axes=(None, 0, 0, 0))(p, x, y, m)
        got["vmap_jbp"] = jax.vmap(
            lambda p, xi, yi, mi: jbp.backprop(net, loss)(p, xi, yi, mask=mi),
            in_axes=(None, 0, 0, 0),
        )(p, x, y, m)
        return got

    got = jax.device_get(run(params, x, y, mask))  # numpy from here on
    assume(any(np.any(np.asarray(v) != 0) for v in jtu.tree_leaves(got["ref"])))
    _close(got["grad"], got["ref"], 1e-9, ("backprop", "jax.grad"))
    _close(got["vmap_jbp"], got["vmap_ref"], 1e-9, ("vmap(backprop)", "vmap(jax.grad)"))
    # a "mean" loss of one example is its per-example loss; of B examples, 1/B of it
    per_ex = got["vmap_ref"]
    _close(got["per_example_grads"], per_ex, 1e-9, ("per_example_grads", "vmap(jax.grad)"))
    sq = sum(np.sum(v.reshape(v.shape[0], -1) ** 2, axis=1) for v in jtu.tree_leaves(per_ex))
    np.testing.assert_allclose(got["norms"], np.sqrt(sq), rtol=1e-9, atol=1e-12)
    _close(got["sum_grad_squared"], jtu.tree_map(lambda g: np.sum(g * g, 0), per_ex), 1e-9)
    scale = 1.0 / x.shape[0] if jbp._losses.get_loss(loss).reduction == "mean" else 1.0
    c = np.minimum(1.0, max_norm / np.maximum(np.sqrt(sq), 1e-30)) * scale
    want = jtu.tree_map(lambda g: np.tensordot(c, g, axes=1), per_ex)
    _close(got["clipped"][0], want, 1e-9, ("clipped_grad", "vmap(jax.grad), clipped"))


def test_eager_backprop_and_hessian_of_a_tiny_lstm():
    """Eager (no jit) backprop = jax.grad (compiled: one program, not one per op), and
    jacfwd(backprop) = jax.hessian(objective): BPTT is differentiable and its derivative
    is the true one, on a padded batch."""
    net = jbp.Sequential([jbp.LSTM(2, 2), jbp.Dense(2, 2)])
    params = _perturbed(net, 1)
    rng = np.random.default_rng(1)
    x, mask = _padded(rng, [3, 2], 3, 2)
    y = jnp.asarray([0, 1])
    kw = {"mask": mask}
    ref = jax.jit(jax.grad(jbp.objective(net, "softmax_xent")))(params, x, y, **kw)
    with jax.disable_jit():
        _close(jbp.backprop(net, "softmax_xent")(params, x, y, **kw), ref, 1e-12)
    hess = jax.jit(jax.jacfwd(lambda p: jbp.backprop(net, "softmax_xent")(p, x, y, **kw)))(params)
    ref = jax.jit(jax.hessian(lambda p: jbp.objective(net, "softmax_xent")(p, x, y, **kw)))(params)
    _close(hess, ref, 1e-9, ("jacfwd(backprop)", "jax.hessian"))


def test_padding_invariance_of_recurrent_networks():
    """The padding-invariance property (see test_modern) on recurrent networks: a padded
    example's grads, norms, Σg², clipped sum and GGN diagonal are its own alone."""
    from test_modern import check_padding_invariance

    @settings(max_examples=_examples(4))
    @given(
        problem=jt.padded_problems(
            nets=jt.recurrents(max_depth=2, max_width=3, max_length=4),
            dtypes=("float64",),
            max_batch=3,
        )
    )
    def run(problem):
        check_padding_invariance(problem)

    run()


def test_curvature_of_a_padded_bidirectional_network():
    """diag_ggn, per_example_diag_ggn, sqrt_ggn and ggn_vector_product (tangents by the
    forward scan of the linearised cells) against autodiff; kfac factors for every
    recurrent weight, GRU's biases paired with their projections."""
    net = jbp.Sequential(
        [
            jbp.bidirectional(
                jbp.GRU(2, 3, return_sequences=True), jbp.LSTM(2, 2, return_sequences=True)
            ),
            jbp.Recurrent(MinimalGatedCell(5, 3)),
            jbp.Dense(3, 3),
        ]
    )
    params = _perturbed(net, 2)
    rng = np.random.default_rng(2)
    x, mask = _padded(rng, [4, 1, 3], 4, 2)
    y = jnp.asarray([0, 2, 1])
    report = jbp.check_curvature(net, "softmax_xent", params, x, y, mask=mask)
    assert report.passed, report.format()
    assert {r.quantity for r in report.rows} >= {"diag_ggn", "ggn_vector_product", "sqrt_ggn"}
    factors = jax.jit(jbp.kfac(net, "softmax_xent", kind="kflr"))(params, x, y, mask=mask)
    gru, lstm = factors[0][0], factors[0][1][1]
    assert set(gru) == {"wi", "wh"} and set(lstm) == {"wi", "wh"}
    assert gru["wi"].a.shape == (3, 3) and gru["wi"].g.shape == (9, 9)  # bi paired: 2 + 1
    assert lstm["wi"].a.shape == (2, 2)  # the LSTM's one bias is shared by wi and wh: unpaired
    # A of the GRU's wi: the second moment of [x_t, 1] over the real steps only
    xt = np.concatenate([np.asarray(x), np.ones((3, 4, 1))], axis=-1)[np.asarray(mask)]
    np.testing.assert_allclose(gru["wi"].a, xt.T @ xt / len(xt), rtol=1e-12)


# --- planted bugs, each caught ----------------------------------------------------


def _bptt_loop(layer, params, cache, delta_out, *, late=False, mask_backward=True):
    """BPTT as a Python loop over time from the cell's step_backward, with switches
    that plant bugs: ``late``: the recurrent δ of step t+1 reaches step t-1 (one step
    late), ``mask_backward=False``: padded steps not skipped in the backward pass."""
    cell = layer.cell
    x, _, caches, mask = cache
    steps = x.shape[1]
    if not mask_backward:
        mask = None
    zeros = jnp.zeros((x.shape[0], cell.hidden), x.dtype)
    d = [zeros] * cell.state_parts
    if not layer.return_sequences:
        d[0] = delta_out
    pending = zeros
    d_gis, d_ghs = [None] * steps, [None] * steps
    for t in reversed(range(steps)):
        if layer.return_sequences:
            d_out = (
                delta_out[:, t] if mask is None else jnp.where(mask[:, t, None], delta_out[:, t], 0)
            )
            d[0] = d[0] + d_out
        cache_t = jtu.tree_map(lambda v, t=t: v[t], caches)
        d_gi, d_gh, direct = cell.step_backward(cache_t, tuple(d))
        d_gh = d_gi if d_gh is None else d_gh
        recurrent = d_gh @ params["wh"].T
        if late:
            recurrent, pending = pending, recurrent
        new = [recurrent if direct[0] is None else direct[0] + recurrent]
        new += [
            jnp.zeros_like(v) if p is None else p for p, v in zip(direct[1:], d[1:], strict=True)
        ]
        if mask is not None:
            m = mask[:, t, None]
            new = [jnp.where(m, n, o) for n, o in zip(new, d, strict=True)]
            d_gi, d_gh = jnp.where(m, d_gi, 0), jnp.where(m, d_gh, 0)
        d, d_gis[t], d_ghs[t] = new, d_gi, d_gh
    return jnp.stack(d_gis, 1), jnp.stack(d_ghs, 1)


def _bptt_mutant(base: type, **switches: Any) -> type:
    @jtu.register_static
    @dataclasses.dataclass(frozen=True)
    class Mutant(base):
        def _deltas(self, params, cache, delta_out):
            return _bptt_loop(self, params, cache, delta_out, **switches)

    return Mutant


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class ForgetGateOnNewState(jbp.LSTMCell):
    def step_backward(self, cache, d_state):
        i, f, g, o, c, tc = cache
        return super().step_backward((i, f, g, o, f * c + i * g, tc), d_state)


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class ResetBeforeProduct(jbp.GRUCell):
    def step_backward(self, cache, d_state):
        d_gi, _, direct = super().step_backward(cache, d_state)
        return d_gi, d_gi, direct  # δgh_n = δn: r treated as if it gated h before wh


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class LastStateFromPaddedEnd(jbp.GRU):
    def forward(self, params, a, context=None):
        context = context or jbp.Context()
        m = context.mask
        a = a if m is None else jnp.where(m[..., None], a, 0)
        return super().forward(params, a, context._replace(mask=None))


@jtu.register_static
@dataclasses.dataclass(frozen=True)
class MaskForwardOnly(jbp.LSTM):
    def _deltas(self, params, cache, delta_out):
        return super()._deltas(params, (*cache[:3], None), delta_out)


MUTANTS = {
    "BPTT one step late": _bptt_mutant(jbp.LSTM, late=True)(2, 3, return_sequences=True),
    "forget gate's derivative on the new cell state": jbp.Recurrent(ForgetGateOnNewState(2, 3)),
    "GRU's reset gate before the recurrent product": jbp.Recurrent(ResetBeforeProduct(2, 3)),
    "the mask applied forward but not backward": MaskForwardOnly(2, 3),
    # with a sequence output the masked loss sends no δ into the pads: the last state's does
    "the loop reference with the mask dropped backward": _bptt_mutant(jbp.GRU, mask_backward=False)(
        2, 3
    ),
}


def test_the_loop_reference_itself_passes():
    """The loop BPTT without planted bugs agrees with autodiff (so its mutants' failures
    are the bugs')."""
    layer = _bptt_mutant(jbp.LSTM)(2, 3, return_sequences=True)
    assert jbp.check_layer(layer, (4, 2), padded=True).ok


@pytest.mark.parametrize("name", list(MUTANTS))
def test_recurrent_mutants_are_caught(name):
    layer = MUTANTS[name]
    net = jbp.Sequential([layer, jbp.Dense(3, 3)])
    params = _perturbed(net, 4)
    rng = np.random.default_rng(4)
    x, mask = _padded(rng, [4, 2, 3], 4, 2)
    out = net.output_shape((4, 2))
    y = jnp.asarray(rng.integers(0, 3, (3, *out[:-1])))
    report = jbp.verify(net, "softmax_xent", params, x, y, mask=mask)
    assert not report.ok, f"{name} not caught:\n{report}"


def test_last_state_from_the_padded_end_is_caught_by_padding_invariance():
    """A forward bug (the padded sequence's last state taken after its pads) keeps
    backward consistent with forward, so verify cannot see it; the padding-invariance
    property does: the example's norm padded differs from its norm alone."""
    rng = np.random.default_rng(5)
    x, mask = _padded(rng, [4, 2], 4, 2)
    y = jnp.asarray([1, 0])
    for layer, caught in ((jbp.GRU(2, 3), False), (LastStateFromPaddedEnd(2, 3), True)):
        net = jbp.Sequential([layer, jbp.Dense(3, 3)])
        params = _perturbed(jbp.Sequential([jbp.GRU(2, 3), jbp.Dense(3, 3)]), 5)
        norms = jax.jit(jbp.per_example_norms(net, "softmax_xent"))
        padded = norms(params, x, y, mask=mask)[1]
        alone = norms(params, x[1:, :2], y[1:])[0]
        assert (abs(float(padded - alone)) > 1e-6) == caught, (layer, padded, alone)


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: jbp.LSTM(0, 3), r"`features` must be a positive int, got 0"),
        (lambda: jbp.GRU(3, 2.5), r"`hidden` must be a positive int, got 2.5"),
        (lambda: jbp.RNN(3, 2, "nope"), r"unknown activation 'nope'"),
        (lambda: jbp.Recurrent(object()), r"`cell` \(.*\) has no step\(...\): see jbp.Cell"),
        (
            lambda: jbp.Sequential([jbp.LSTM(3, 4), jbp.Dense(5, 2)]),
            r"`layers\[1\]` \(Dense.*\) expects fan_in=5 but the layers before it give 4",
        ),
        (
            lambda: jbp.Sequential([jbp.Embedding(5, 6), jbp.GRU(4, 4)]),
            r"`layers\[1\]` \(GRU.*\) expects fan_in=4 but the layers before it give 6",
        ),
        (
            lambda: jbp.bidirectional(jbp.LSTM(2, 2), jbp.GRU(2, 2, return_sequences=True)),
            r"must be recurrent layers with the same return_sequences, got False and True",
        ),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_wrong_input_shapes_and_a_cell_without_tangent_are_named():
    net = jbp.Sequential([jbp.LSTM(3, 4), jbp.Dense(4, 2)])
    params = net.init(jax.random.key(0), F64)
    with pytest.raises(
        ValueError, match=r"`x` has 4 features but the first layer expects fan_in=3"
    ):
        jbp.backprop(net, "half_sse")(params, jnp.ones((2, 5, 4)), jnp.ones((2, 2)))
    with pytest.raises(jbp.ShapeError, match=r"expects sequences \(T, features=3\) per example"):
        jbp.LSTM(3, 4).output_shape((5,))
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, length, channels\) or"):
        jbp.backprop(net, "half_sse")(params, jnp.ones((2, 5, 3, 1)), jnp.ones((2, 2)))

    @jtu.register_static
    @dataclasses.dataclass(frozen=True)
    class NoTangent(jbp.RNNCell):
        step_tangent = None  # type: ignore[assignment]

    net = jbp.Sequential([jbp.Recurrent(NoTangent(2, 2)), jbp.Dense(2, 1)])
    params = net.init(jax.random.key(0), F64)
    v = jtu.tree_map(jnp.ones_like, params)
    with pytest.raises(TypeError, match=r"has no step_tangent\(cache, gi_dot, gh_dot, state_dot\)"):
        jbp.ggn_vector_product(net, "half_sse")(params, jnp.ones((2, 3, 2)), jnp.ones((2, 1)), v)
    assert _recurrent.RecurrentBase.takes_context


def test_cli_verify_train_and_bench_recurrent(tmp_path, capsys):
    from jbp.cli import main

    assert main(["verify", "--count", "2", "--arch", "rnn", "--dtype", "float64"]) == 0
    assert "OK: all 2 problems pass" in capsys.readouterr().out
    argv = ["train", "--model", "gru", "--data", "majority", "--features", "4", "--depth", "1",
            "--max-steps", "3", "--check-every", "1", "--batch-size", "8", "--epochs", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gru: embedding 4→4, 1 GRU layer of 4, the last real step → dense 4" in out, out
    assert "45% of the steps padding" in out
    argv = ["bench", "--arch", "lstm", "--batches", "2", "--rounds", "3", "--only",
            "per_example_norms", "--json", str(tmp_path / "bench.json")]  # fmt: skip
    assert main(argv) == 0
    assert "LSTM(32→128, sequences) → LSTM(128→128) → Dense(128→10)" in capsys.readouterr().out
    assert main(["train", "--model", "lstm", "--data", "xor"]) == 2
    assert "--model lstm needs sequences" in capsys.readouterr().err
