"""Checking hand-written rules: ``check_vjp`` on custom VJPs, ``Report.blame`` naming
the planted layer at every depth, drafts that fail usefully, bad inputs named."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jbp
import jbp.testing as jt
from jbp.layers._base import walk_layers

F32 = jax.ShapeDtypeStruct


# --- check_vjp -------------------------------------------------------------------


@jax.custom_vjp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


softplus.defvjp(lambda x: (softplus(x), x), lambda x, c: (c * jax.nn.sigmoid(x),))


@jax.custom_jvp
def logsumexp_rows(x):
    return jax.nn.logsumexp(x, axis=-1)


@logsumexp_rows.defjvp
def _logsumexp_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    out = logsumexp_rows(x)
    return out, jnp.sum(jnp.exp(x - out[..., None]) * t, axis=-1)


def _linear_fwd(x, w, scale):
    return x @ w * scale, (x, w, scale)


def _linear_bwd(res, c):
    x, w, scale = res
    return c @ w.T * scale, x.T @ c * scale, None


def _linear_bwd_wrong_w(res, c):
    x, w, scale = res
    return c @ w.T * scale, x.T @ c, None  # BUG: ∂/∂w forgets the scale


def _rows(report):
    return {(r.path, r.oracle): r for r in report.rows}


def test_check_vjp_passes_right_rules_and_locates_a_wrong_one():
    # custom_vjp, float32 primals drawn from their ShapeDtypeStruct: both oracles per leaf.
    report = jbp.check_vjp(softplus, F32((4, 3), jnp.float32))
    assert report.ok, report
    # Rows named by position and by the function's own parameter names.
    assert set(_rows(report)) == {
        ("primals[0] (x)", "autodiff"),
        ("primals[0] (x)", "finite differences"),
    }
    assert report.precision == "highest" and report.dtype == "float32"
    assert report.taylor is not None and report.taylor.ok
    assert json.loads(json.dumps(report.to_json()))["ok"] is True
    # custom_jvp: the VJP is the transposed JVP rule.
    assert jbp.check_vjp(logsumexp_rows, F32((3, 5), jnp.float64)).ok

    # A (fwd, bwd) pair with an integer argument (held fixed, said in the notes).
    x, w = F32((2, 3), jnp.float64), F32((3, 4), jnp.float64)
    good = jbp.check_vjp((_linear_fwd, _linear_bwd), x, w, jnp.int32(3))
    assert good.ok, good
    assert any("primals[2]: held fixed (not floating" in n for n in good.notes)
    bad = jbp.check_vjp((_linear_fwd, _linear_bwd_wrong_w), x, w, jnp.int32(3))
    rows = _rows(bad)
    assert not bad.ok and bad.first_mismatch.path == "primals[1] (w)"
    assert rows["primals[0] (x)", "autodiff"].ok and rows["primals[0] (x)", "finite differences"].ok
    # Both oracles see the wrong leaf, by the planted factor: |3g − g| / |3g| = 2/3.
    for oracle in ("autodiff", "finite differences"):
        assert rows["primals[1] (w)", oracle].rel_err == pytest.approx(2 / 3, rel=1e-6)
    assert not bad.taylor.ok and bad.taylor.order == pytest.approx(1.0, abs=0.2)
    text = str(bad)
    assert "VJP check: MISMATCH" in text and "first mismatch: primals[1] (w)" in text


@jax.custom_vjp
def relu(x):
    return jnp.maximum(x, 0.0)


relu.defvjp(lambda x: (relu(x), x), lambda x, c: (c * (x > 0),))


@jax.custom_vjp
def relu_wrong_at_kink(x):
    return jnp.maximum(x, 0.0)


relu_wrong_at_kink.defvjp(lambda x: (relu(x), x), lambda x, c: (c * (x >= 0) * 2.0,))


@jax.custom_vjp
def cube_root(x):  # an implicit layer: Newton's iterations in a while_loop
    def body(state):
        y, _ = state
        return y - (y**3 - x) / (3 * y**2), y

    def cond(state):
        y, prev = state
        return jnp.max(jnp.abs(y - prev)) > 1e-14 * jnp.max(jnp.abs(y))

    return jax.lax.while_loop(cond, body, (x, x + 1.0))[0]


cube_root.defvjp(lambda x: (cube_root(x), cube_root(x)), lambda y, c: (c / (3 * y**2),))


@jax.custom_vjp
def round_ste(x):  # a straight-through estimator; its stated surrogate is the identity
    return jnp.round(x)


round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, c: (c,))


def test_check_vjp_kinks_implicit_layers_and_surrogates():
    # relu at exactly 0: any value between the one-sided derivatives (0 and 1) is right,
    # whichever side autodiff of jnp.maximum picks; a 2 there is not.
    x = jnp.array([-1.5, 0.0, 2.0, 0.0])
    report = jbp.check_vjp(relu, x)
    assert report.ok, report
    assert "2 at a kink" in _rows(report)["primals[0] (x)", "finite differences"].note
    assert any("Taylor test: skipped" in n for n in report.notes)
    wrong = jbp.check_vjp(relu_wrong_at_kink, x)
    assert not wrong.ok
    assert not _rows(wrong)["primals[0] (x)", "finite differences"].ok

    # A while_loop cannot be reverse-differentiated: finite differences decide.
    positive = jnp.array([0.5, 2.0, 7.0], jnp.float64)
    implicit = jbp.check_vjp(cube_root, positive)
    assert implicit.ok, implicit
    assert {r.oracle for r in implicit.rows} == {"finite differences"}
    assert any("autodiff of the reference is unavailable" in n for n in implicit.notes)

    # A straight-through estimator checked against its stated surrogate.
    ste = jbp.check_vjp(round_ste, F32((5,), jnp.float64), reference=lambda x: x)
    assert ste.ok, ste
    # Without it, the reference is round's own (zero) derivative: the rule differs.
    assert not jbp.check_vjp(round_ste, F32((5,), jnp.float64), finite_differences=False).ok

    # A plain function: its own rules, finite differences only.
    plain = jbp.check_vjp(lambda x: softplus(x) * 2.0, F32((3,), jnp.float64))
    assert plain.ok and {r.oracle for r in plain.rows} == {"finite differences"}
    # No oracle at all is a failure, never a silent pass.
    blind = jbp.check_vjp(lambda x: softplus(x), F32((3,), jnp.float64), finite_differences=False)
    assert not blind.ok and "no oracle could check this leaf" in str(blind)


def test_check_vjp_bad_arguments_are_named():
    x = F32((3,), jnp.float32)
    cases = [
        ((3,), {}, TypeError, "`f` must be a jax.custom_vjp"),
        (((softplus,),), {}, TypeError, "`f` as a tuple must be a (fwd, bwd) pair"),
        ((softplus,), {}, ValueError, "`primals` is empty"),
        ((softplus, jnp.array([1.0, jnp.nan])), {}, ValueError, "`primals[0]` holds NaN or Inf"),
        ((softplus, {"a": jnp.array([jnp.inf])}), {}, ValueError, "`primals[0]['a']` holds NaN"),
        ((softplus, F32((2,), jnp.int32)), {}, TypeError, "only floating leaves are drawn"),
        ((softplus, object()), {}, TypeError, "`primals[0]` must be an array, got object"),
        ((softplus, jnp.array([1 + 2j])), {}, TypeError, "must be a floating or integer array, got complex"),
        ((softplus, x), {"reference": 3}, TypeError, "`reference` must be a function"),
        ((softplus, x), {"fd_coordinates": 0}, ValueError, "`fd_coordinates` must be a positive"),
        ((softplus, x), {"key": 0}, TypeError, "`key` must be a PRNG key"),
        ((softplus, x), {"cotangent": jnp.ones(4)}, ValueError, "`cotangent` must have the output's shape (3,)"),
        ((lambda n: n * 2, jnp.int32(3)), {}, ValueError, "no floating argument"),
        ((lambda x: jnp.int32(1), x), {}, ValueError, "returns no floating output"),
        ((lambda x: x @ x.T, F32((3,), jnp.float32), F32((2,), jnp.float32)), {}, ValueError,
         "`f` cannot be called on the primals"),
    ]  # fmt: skip
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            jbp.check_vjp(*args, **kwargs)
    # A rule that raises is a failed row with its message, not a crash.
    broken = jax.custom_vjp(lambda x: x * 2.0)
    broken.defvjp(lambda x: (x * 2.0, None), lambda _, c: (c.missing,))
    report = jbp.check_vjp(broken, x)
    assert not report.ok and "the hand-written VJP raised AttributeError" in str(report)


# --- blame ------------------------------------------------------------------------


def _planted(layer):
    """``layer`` (its class subclassed) with a planted bug: its backward's δ_in and
    gradient scaled by 1.5 (a combinator: its own δ_in only)."""
    cls = type(layer)

    def backward_walk(self, params, cache, delta_out, at_leaf):
        results, delta = cls.backward_walk(self, params, cache, delta_out, at_leaf)
        return results, delta * 1.5

    def backward(self, params, cache, delta_out):
        grads, delta = cls.backward(self, params, cache, delta_out)
        grads = jax.tree_util.tree_map(lambda g: 1.5 * g, grads)
        return grads, None if delta is None else delta * 1.5

    body = {"backward_walk": backward_walk} if hasattr(cls, "backward_walk") else {}
    body = body or {"backward": backward}
    planted = dataclasses.dataclass(frozen=True)(type(f"Planted{cls.__name__}", (cls,), body))
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.init}
    return planted(**fields)


def _replace(node, path, new):
    """``node`` with the layer at ``path`` (e.g. ``layers[1].block``) replaced."""
    if not path:
        return new
    head, _, rest = path.partition(".")
    name, _, index = head.partition("[")
    child = getattr(node, name)
    if isinstance(node, jbp.Tied):
        return jbp.Tied(_replace(child, rest, new), node.source, dict(node.leaves), node.transpose)
    if index:
        i = int(index[:-1])
        kids = list(child)
        kids[i] = _replace(kids[i], rest, new)
        return dataclasses.replace(node, **{name: tuple(kids)})
    return dataclasses.replace(node, **{name: _replace(child, rest, new)})


def _get(node, path):
    for head in path.split("."):
        name, _, index = head.partition("[")
        node = getattr(node, name)
        if index:
            node = node[int(index[:-1])]
    return node


def _problem(net, x, y):
    params = net.init(jax.random.key(1), jnp.float64)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size)).reshape(p.shape), params
    )
    return params


RNG = np.random.default_rng(0)
RESNET = jbp.Sequential([
    jbp.Dense(4, 6, "tanh"),
    jbp.Residual(jbp.Sequential([jbp.Dense(6, 6, "tanh"), jbp.LayerNorm(6)])),
    jbp.Parallel([jbp.Dense(6, 3, "tanh"), jbp.Dense(6, 3, "sigmoid")], "concat"),
    jbp.Dense(6, 2),
])  # fmt: skip
CNN = jbp.Sequential([jbp.Conv(2, 3, (3, 3), "tanh"), jbp.Flatten(), jbp.Dense(75, 2)])
LLAMA = jbp.llama(vocab=11, features=8, heads=2, depth=1, tie_embeddings=True)
# Planted at every depth: top-level leaves and combinators, a combinator's block, the
# layers inside it, a Parallel's branch; a conv and a parameterless Flatten;
# attention, a SwiGLU gate's branch four levels down, the tied output projection.
CASES = [
    (RESNET, "mse", RNG.standard_normal((3, 4)), RNG.standard_normal((3, 2)),
     ["layers[1]", "layers[1].block", "layers[1].block.layers[1]", "layers[2].branches[0]",
      "layers[3]"]),
    (CNN, "mse", RNG.standard_normal((2, 5, 5, 2)), RNG.standard_normal((2, 2)),
     ["layers[0]", "layers[1]"]),
    (LLAMA, "softmax_xent", RNG.integers(0, 11, (2, 4)), RNG.integers(0, 11, (2, 4)),
     ["layers[1].block.layers[1]", "layers[2].block.layers[1].layers[0].branches[1]",
      "layers[4].layer"]),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(CASES)), ids=["resnet", "cnn", "llama"])
def test_blame_names_the_planted_layer_at_every_depth(case):
    net, loss, x, y, paths = CASES[case]
    x = jnp.asarray(x, jnp.float64) if x.dtype.kind == "f" else jnp.asarray(x, jnp.int32)
    y = jnp.asarray(y, jnp.float64) if y.dtype.kind == "f" else jnp.asarray(y, jnp.int32)
    params = _problem(net, x, y)
    clean = jbp.verify(net, loss, params, x, y)
    assert clean.ok and clean.blame is None and clean.rules == ()
    for path in paths:
        mutant = _replace(net, path, _planted(_get(net, path)))
        report = jbp.verify(mutant, loss, params, x, y)
        assert not report.ok, path
        assert report.blame == path, f"planted at {path}:\n{report}"
        failed = {r.path for r in report.rules if not r.ok}
        assert path in failed and all(path.startswith(p) or p == "net" for p in failed), failed
    # In the text and the JSON (the last mutant's).
    assert f"blame: {paths[-1]}" in str(report)
    assert json.loads(json.dumps(report.to_json()))["blame"] == paths[-1]
    # The rules checked are exactly the layers the forward calls (a Tied layer's
    # inner layer, not the Tied wrapper), the network and the loss.
    called = {p.removeprefix("net.") for p, layer in walk_layers(net)
              if p != "net" and not isinstance(layer, jbp.Tied)}  # fmt: skip
    assert {r.path for r in report.rules} == called | {"net", "loss"}


def test_blame_names_the_loss_and_combinators_in_check_layer():
    x, y = jnp.asarray(RNG.standard_normal((3, 4))), jnp.asarray(RNG.standard_normal((3, 2)))
    params = _problem(RESNET, x, y)
    wrong_loss = jbp.Loss("half_sse_wrong", lambda a, y: 0.5 * jnp.sum((a - y) ** 2, -1),
                          lambda a, y: 2.0 * (a - y), "sum")  # fmt: skip
    report = jbp.verify(RESNET, wrong_loss, params, x, y)
    assert report.blame == "loss", report
    # check_layer on a combinator blames inside it; on a leaf layer, "layer".
    block = RESNET.layers[1]
    mutant = _replace(block, "block.layers[0]", _planted(block.block.layers[0]))
    report = jbp.check_layer(mutant, (6,))
    assert not report.ok and report.blame == "block.layers[0]", report
    assert jbp.check_layer(_planted(jbp.Dense(3, 2)), (3,)).blame == "layer"
    assert jbp.check_layer(block, (6,)).blame is None


# --- drafts -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale(jbp.Layer):
    features: int

    def init(self, key, dtype=jnp.float32):
        return {"s": jnp.ones((self.features,), dtype)}

    def forward(self, params, a):  # a: (batch, features)
        return a * params["s"][None], a

    def backward(self, params, cache, delta_out):
        return {"s": jnp.sum(delta_out * cache, axis=0)}, delta_out * params["s"][None]


class RaisingPerExample(Scale):
    def per_example_grads(self, params, cache, delta_out):
        raise NotImplementedError("per-example rule still to write")


class WrongTangent(Scale):
    def tangent(self, params, cache, a_dot, params_dot):
        return a_dot * params["s"][None]  # BUG: the params_dot term is missing


class RaisingBackward(Scale):
    def backward(self, params, cache, delta_out):
        raise ValueError("unfinished")


def test_drafts_fail_usefully():
    draft = jbp.check_layer(Scale(3), (3,))
    assert draft.ok, draft  # backward right; the optional methods are notes, not failures
    assert [r.path for r in draft.rows] == ["backward grads['s']", "backward delta_in"]
    assert any("per-example rules: not implemented" in n for n in draft.notes)
    assert any("tangent: not implemented" in n for n in draft.notes)

    raising = jbp.check_layer(RaisingPerExample(3), (3,))
    rows = {r.path: r for r in raising.rows}
    assert rows["backward grads['s']"].ok and rows["backward delta_in"].ok
    assert not rows["per_example"].ok
    assert "raised NotImplementedError: per-example rule still to write" in rows["per_example"].note

    tangent = jbp.check_layer(WrongTangent(3), (3,))
    assert not tangent.ok and [r.path for r in tangent.rows if not r.ok] == ["tangent"]
    assert tangent.blame is None  # the backward is right: no rule to blame for a tangent

    crash = jbp.check_layer(RaisingBackward(3), (3,))
    assert not crash.ok and crash.blame == "layer"
    assert "backward  ()" in str(crash) and "raised ValueError: unfinished" in str(crash)


def test_verify_and_check_curvature_name_non_finite_inputs():
    net = jbp.mlp([3, 2], "tanh")
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    bad_params = ({"w": params[0]["w"].at[0, 0].set(jnp.inf), "b": params[0]["b"]},)
    cases = [
        ((params, x.at[1, 2].set(jnp.nan), y), "`x` holds NaN or Inf (1 of 12 values)"),
        ((params, x, y.at[0, 0].set(jnp.inf)), "`y` holds NaN or Inf (1 of 8 values)"),
        ((bad_params, x, y), "`params[0]['w']` holds NaN or Inf (1 of 6 values)"),
    ]
    for check in (jbp.verify, jbp.check_curvature):
        for args, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                check(net, "mse", *args)


# --- property tests over shapes and dtypes ------------------------------------------


@settings(max_examples=3, deadline=None)
@given(jt.vjp_inputs([("n", "m"), ("m", "k")], dims={"k": st.sampled_from([1, 3])}))
def test_vjp_inputs_property_test_a_pair(xw):
    x, w = xw
    assert x.shape[1] == w.shape[0] and w.shape[1] in (1, 3) and x.dtype == w.dtype
    jbp.check_vjp((_linear_fwd, _linear_bwd), x, w, 2).raise_if_failed()


def test_vjp_inputs_bad_arguments_are_named():
    cases = [
        ("ab", {}, TypeError, "`shapes` must be a non-empty sequence of shapes"),
        ([(2, -1)], {}, ValueError, "`shapes[0]` entries must be sizes ≥ 0 or dimension names"),
        ([3], {}, TypeError, "`shapes[0]` must be a tuple of ints or names"),
        ([("n",)], {"dims": {"m": (1, 2)}}, ValueError, "`dims` names ['m'], which no shape uses"),
        (
            [("n",)],
            {"dims": {"n": 3}},
            TypeError,
            "`dims['n']` must be an int strategy or a (lo, hi)",
        ),
        ([("n",)], {"dims": {"n": (3, 2)}}, ValueError, "`dims['n'][0]`=3 is larger than"),
        ([(2,)], {"scale": 0}, ValueError, "`scale` must be a positive finite number"),
        ([(2,)], {"dtypes": ("int32",)}, ValueError, "`names` must hold floating dtypes"),
    ]
    for shapes, kwargs, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            jt.vjp_inputs(shapes, **kwargs)


# --- precision -------------------------------------------------------------------


def test_every_check_computes_and_records_highest_under_a_lower_global_default():
    """On a GPU (TF32) or TPU (one bfloat16 pass) a float32 check at the device's
    default would report round-off as mismatches: every check traces both of its
    sides, and the blame's per-layer checks, at "highest", whatever the global
    default, and says so in its report."""
    seen = []

    def probe(z):  # records the precision each side is traced at
        seen.append(jax.config.jax_default_matmul_precision)
        return jnp.tanh(z)

    jbp.register_activation("precision_probe", probe, lambda z, out: 1 - out**2)
    jbp.register_activation("precision_probe_bug", probe, lambda z, out: 1 - out)  # wrong
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "bfloat16")
    try:
        net = jbp.mlp([2, 3, 2], "precision_probe", final_activation="precision_probe_bug")
        params = net.init(jax.random.key(0), jnp.float32)
        report = jbp.verify(net, "half_sse", params, x, y)
        curvature = jbp.check_curvature(net, "half_sse", params, x, y)
        layer = jbp.check_layer(jbp.Activation("precision_probe"), (2,), dtype="float32")
        assert report.blame == "layers[1]" and layer.ok  # the bug found, in its layer
        reports = (report, curvature, layer, jbp.check_vjp(probe, F32((4,), jnp.float32)))
        assert jax.config.jax_default_matmul_precision == "bfloat16"  # left as it was
    finally:
        jax.config.update("jax_default_matmul_precision", before)
    assert seen and set(seen) == {"highest"}, seen
    for r in reports:
        assert r.precision == "highest" and r.to_json()["precision"] == "highest"
        assert "matmul precision highest" in r.format().splitlines()[1 - (r is curvature)]
