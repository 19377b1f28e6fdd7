"""Transformers and attention stacks: backprop = jax.grad (jit, eager, vmap over
single sequences), per-example quantities = vmap(jax.grad), jacfwd(backprop) =
hessian(objective) on a tiny attention network, and planted bugs in attention's
backward and the embedding's scatter, each caught."""

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
from jbp.layers import _attention

LIVE = tuple(a for a in jbp.activation_names() if a != "relu")
SMOOTH = tuple(a for a in LIVE if a not in ("leaky_relu", "elu"))
NETS = st.one_of(jt.transformers(activations=LIVE), jt.sequence_stacks(activations=LIVE))


def _examples(n: int) -> int:
    return max(1, round(n * settings.default.max_examples / 25))


def _nonzero(tree: Any) -> bool:
    return any(np.any(np.asarray(g) != 0) for g in jtu.tree_leaves(tree))


def _check(tested: Any, reference: Any, names: tuple[str, str], **kw: Any) -> None:
    jbp.compare(tested, reference, names=names, **kw).raise_if_failed()


@settings(max_examples=_examples(4))
@given(problem=jt.problems(nets=NETS, max_batch=4))
def test_backprop_matches_jax_grad_under_jit(problem):
    net, loss, params, x, y = problem
    manual, reference = jbp.backprop(net, loss), jax.grad(jbp.objective(net, loss))
    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(reference)(params, x, y)
        assume(_nonzero(g_ref))
        _check(jax.jit(manual)(params, x, y), g_ref, ("jit(backprop)", "jit(jax.grad)"))


def test_backprop_matches_jax_grad_eagerly():
    """jbp's backprop op by op, without jit: every op compiles on its own, so one fixed
    causal transformer (float64) rather than random draws; the token range is read here.
    The reference is compiled (one program, not one per op)."""
    rng = np.random.default_rng(7)
    net = jbp.transformer(7, 5, 6, 2, 1, activation="tanh")
    params = net.init(jax.random.key(1), jnp.float64)
    x, y = (jnp.asarray(rng.integers(0, 7, (3, 5))) for _ in range(2))
    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(jax.grad(jbp.objective(net, "softmax_xent")))(params, x, y)
        assert _nonzero(g_ref)
        g = jbp.backprop(net, "softmax_xent")(params, x, y)
    _check(g, g_ref, ("backprop", "jit(jax.grad)"), rtol=1e-11)


@settings(max_examples=_examples(3))
@given(
    problem=jt.problems(nets=NETS, dtypes=("float64",), single=False, max_batch=4),
    max_norm=st.floats(0.05, 5.0),
)
def test_per_example_quantities_match_vmap_of_jax_grad(problem, max_norm):
    net, loss, params, x, y = problem
    b = x.shape[0]
    objective = jbp.objective(net, loss)
    fns = {
        "ref": jax.vmap(jax.grad(objective), in_axes=(None, 0, 0)),
        "vmap(backprop)": jax.vmap(jbp.backprop(net, loss), in_axes=(None, 0, 0)),
        "per_example_grads": jbp.per_example_grads(net, loss),
        "sum_grad_squared": jbp.sum_grad_squared(net, loss),
        "clipped_grad": jbp.clipped_grad(net, loss, max_norm),
        **{
            f"norms[{m}]": jbp.per_example_norms(net, loss, method=m)
            for m in ("auto", "gram", "materialise")
        },
    }
    got = jax.jit(lambda p, x, y: {k: f(p, x, y) for k, f in fns.items()})(params, x, y)
    ref = got.pop("ref")
    assume(_nonzero(ref))
    _check(got["vmap(backprop)"], ref, ("vmap(backprop) over sequences", "vmap(jax.grad)"))
    _check(got["per_example_grads"], ref, ("per_example_grads", "vmap(jax.grad)"))
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(b, -1) ** 2, axis=1) for g in jtu.tree_leaves(ref)))
    for m in ("auto", "gram", "materialise"):
        np.testing.assert_allclose(got[f"norms[{m}]"], norms, rtol=1e-10, err_msg=m)
    sq = jtu.tree_map(lambda g: jnp.sum(g * g, axis=0), ref)
    _check(got["sum_grad_squared"], sq, ("sum_grad_squared", "Σ g_i² of vmap(jax.grad)"))
    scale = 1.0 / b if loss in ("mse", "softmax_xent") else 1.0  # the "mean" losses
    c = jnp.minimum(1.0, max_norm / norms) * scale
    clipped, _ = got["clipped_grad"]
    expected = jtu.tree_map(lambda g: jnp.tensordot(c, g, axes=1), ref)
    _check(clipped, expected, ("clipped_grad", "clip then sum of vmap(jax.grad)"))


@settings(max_examples=_examples(2))
@given(
    problem=jt.problems(
        nets=jt.sequence_stacks(activations=SMOOTH, max_blocks=1, max_width=3, max_length=3),
        dtypes=("float64",),
        max_batch=2,
    )
)
def test_jacobian_of_backprop_is_the_hessian_on_attention(problem):
    net, loss, params, x, y = problem
    jac = jax.jit(jax.jacfwd(jbp.backprop(net, loss)))(params, x, y)
    hessian = jax.jit(jax.hessian(jbp.objective(net, loss)))(params, x, y)
    assume(_nonzero(hessian))
    _check(jac, hessian, ("jacfwd(backprop)", "hessian(objective)"))


def test_sequence_losses_average_over_positions():
    """softmax_xent on (B, T, V): ℓ_i is the mean over the example's T tokens and
    C = mean_i ℓ_i, the mean over all tokens; mse and half_sse over every element."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((3, 4, 5)))
    labels = jnp.asarray(rng.integers(0, 5, (3, 4)))
    xent = jbp._losses.get_loss("softmax_xent")
    token = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(xent.per_example(logits, labels), token.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(xent(logits, labels), token.mean(), rtol=1e-12)
    y = jnp.asarray(rng.standard_normal((3, 4, 5)))
    mse = jbp._losses.get_loss("mse")
    np.testing.assert_allclose(mse.per_example(logits, y), ((logits - y) ** 2).mean(axis=(1, 2)))
    half = jbp._losses.get_loss("half_sse")
    np.testing.assert_allclose(
        half.per_example(logits, y), 0.5 * ((logits - y) ** 2).sum(axis=(1, 2))
    )


# --- planted bugs ----------------------------------------------------------------


def _mutant(replacement: Any) -> type:
    """A MultiHeadAttention whose dQ, dK, dV come from ``replacement(self, params,
    cache, delta_out)``: a δ rule with one step written wrong."""

    @dataclasses.dataclass(frozen=True)
    class Mutant(jbp.MultiHeadAttention):
        def _deltas(self, params, cache, delta_out):
            return replacement(self, params, cache, delta_out)

    return Mutant


def _attention_deltas(self, params, cache, delta_out, *, scale=True, mask=True, rowsum=True,
                      swap=False, heads_mixed=False, rope_inverse=True, group_sum=True):  # fmt: skip
    """Attention's input δs with switches for the classic mistakes (q is
    ``(batch, T, KV, G, D)``, k and v ``(batch, S, KV, D)``, P ``(batch, KV, T, G, S)``)."""
    _, q, k, v, p, _ = cache
    d_o = self._split(jax.lax.dot_general(delta_out, params["wo"], (((2,), (1,)), ((), ()))), "q")
    d_p = jax.lax.dot_general(d_o, v, _attention._SCORES)
    if not mask:  # the probabilities recomputed without the causal mask
        s = jax.lax.dot_general(q, k, _attention._SCORES) * self._scale
        e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        p = e / jnp.sum(e, axis=-1, keepdims=True)
    # group_sum=False: a key/value head takes the δ of its group's first query head only
    first_only = (slice(None),) * 3 + (slice(0, 1),)
    p_kv, d_o_kv = (p, d_o) if group_sum else (p[first_only], d_o[:, :, :, 0:1])
    d_v = _attention._key_major(jax.lax.dot_general(p_kv, d_o_kv, _attention._BACK_T))
    d_s = p * (d_p - jnp.sum(d_p * p, axis=-1, keepdims=True)) if rowsum else p * d_p
    d_s = d_s * self._scale if scale else d_s
    # swap: keys where queries belong and back (one query head per group here)
    first, second = (q[:, :, :, 0], k[:, :, :, None]) if swap else (k, q)
    d_q = _attention._query_major(jax.lax.dot_general(d_s, first, _attention._MIX))
    d_s_kv, second_kv = (d_s, second) if group_sum else (d_s[first_only], second[:, :, :, 0:1])
    d_k = _attention._key_major(jax.lax.dot_general(d_s_kv, second_kv, _attention._BACK_T))
    d_q = self._rope(d_q, inverse=rope_inverse)
    d_k = self._rope(d_k, inverse=rope_inverse)
    b, t = delta_out.shape[:2]
    if heads_mixed:  # heads merged in the wrong order: (D, heads) instead of (heads, D)
        merge = lambda x: jnp.swapaxes(x.reshape(b, t, -1, self._d), 2, 3).reshape(b, t, -1)  # noqa: E731
    else:
        merge = lambda x: x.reshape(b, t, -1)  # noqa: E731
    return merge(d_q), merge(d_k), merge(d_v)


def _switch(**kw: Any) -> Any:
    return lambda self, params, cache, delta_out: _attention_deltas(
        self, params, cache, delta_out, **kw
    )


ATTENTION_MUTANTS = {
    "scale dropped": (_switch(scale=False), dict(causal=False)),
    "mask not applied in backward": (_switch(mask=False), dict(causal=True)),
    "softmax δ without its row-sum term": (_switch(rowsum=False), dict(causal=False)),
    "keys and queries swapped in one product": (_switch(swap=True), dict(causal=False)),
    "heads mixed": (_switch(heads_mixed=True), dict(causal=True)),
}


def test_the_switchboard_without_switches_is_right():
    layer = _mutant(_switch())(6, 2, causal=True)
    assert jbp.check_layer(layer, (4, 6)).ok


@pytest.mark.parametrize("name", ATTENTION_MUTANTS)
def test_attention_mutant_is_caught(name):
    replacement, kw = ATTENTION_MUTANTS[name]
    layer = _mutant(replacement)(6, 2, **kw)
    report = jbp.check_layer(layer, (4, 6))
    assert not report.ok, f"{name} not caught:\n{report}"
    failing = {r.path.split("[")[0] for r in report.rows if not r.ok}
    assert "backward delta_in" in failing or "backward grads" in failing, str(report)
    # In a transformer: verify fails, first in a layer at or below the attention.
    net = jbp.Sequential(
        [
            jbp.Embedding(7, 6),
            jbp.Residual(jbp.Sequential([jbp.LayerNorm(6), layer])),
            jbp.LayerNorm(6),
            jbp.Dense(6, 7),
        ]
    )
    params = jax.tree.map(lambda a: a + 0.2, net.init(jax.random.key(0), jnp.float64))
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, 7, (3, 5))) for _ in range(2))
    report = jbp.verify(net, "softmax_xent", params, x, y)
    assert not report.ok, str(report)
    assert report.first_mismatch.layer in (0, 1), str(report)


@dataclasses.dataclass(frozen=True)
class EmbeddingOverwrites(jbp.Embedding):
    """Bug: a token seen twice keeps one δ (scatter-set instead of scatter-add)."""

    def backward(self, params, cache, delta_out):
        table = jnp.zeros_like(params["table"]).at[cache].set(delta_out)
        return {"table": table}, None


def test_embedding_scatter_that_overwrites_is_caught():
    layer = EmbeddingOverwrites(3, 4)  # 3 tokens in sequences of 6: repeats are certain
    report = jbp.check_layer(layer, (6,))
    assert not report.ok
    assert [r.path for r in report.rows if not r.ok] == ["backward grads['table']"], str(report)
    assert jbp.check_layer(jbp.Embedding(3, 4), (6,)).ok
