"""Private training: Poisson sampling in fixed shapes, example masks, the sensitivity of the
clipped sum, the noise, the dp-accounting ledger, and fit(privacy=).

Statistical tests draw from fixed seeds, so they are deterministic; each bound is written
next to it in standard errors (4 or 5), wide enough for any seed to pass with probability
above 1 - 1e-4, so a change of seed or of numpy's generator does not make them flaky.
"""

from __future__ import annotations

import json
import math
import re

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jbp
from jbp._architectures import FAMILIES
from jbp._zoo import random_problem

# --- the sampler --------------------------------------------------------------------------


def test_poisson_batch_sizes_are_binomial_and_each_example_is_drawn_with_rate_q():
    n, e, steps = 1000, 25, 4000
    q = e / n
    sampler = jbp.PoissonSampler(n, e, seed=3)
    counts = np.zeros(n)
    sizes = []
    for k in range(steps):
        idx, mask = sampler.sample(k)
        assert idx.shape == mask.shape == (sampler.padded_size,)
        real = idx[mask]
        assert np.all(np.diff(real) > 0) and mask[: len(real)].all()  # real rows first
        counts[real] += 1
        sizes.append(len(real))
    sizes = np.array(sizes)
    # Binomial(N, q): mean N·q within 4 standard errors, variance N·q(1-q) within 4 of its own.
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(var / steps)
    assert abs(sizes.var(ddof=1) / var - 1) < 4 * math.sqrt(2 / (steps - 1))
    # Each example's count is Binomial(steps, q): the chi-square statistic over the N
    # examples has mean N and standard deviation about sqrt(2N); within 5 of them.
    chi2 = np.sum((counts - steps * q) ** 2 / (steps * q * (1 - q)))
    assert abs(chi2 - n) < 5 * math.sqrt(2 * n)
    # No example is favoured: the largest count is within 5 standard deviations too.
    assert np.max(np.abs(counts - steps * q)) < 5 * math.sqrt(steps * q * (1 - q))
    # A step's sample is a function of (seed, step) only.
    np.testing.assert_array_equal(
        sampler.sample(17)[0], jbp.PoissonSampler(n, e, seed=3).sample(17)[0]
    )
    assert not np.array_equal(sampler.sample(17)[0], jbp.PoissonSampler(n, e, seed=4).sample(17)[0])


def test_a_cap_cuts_large_samples_to_a_random_subset_and_padding_holds_zeros():
    sampler = jbp.PoissonSampler(200, 100, seed=0, max_batch_size=60, multiple_of=16)
    assert sampler.padded_size == 64
    x = np.arange(1, 201, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    seen = np.zeros(200)
    for k in range(200):
        (xb,), mask = sampler.batch((x,), k)
        assert xb.shape == (64, 3) and mask.sum() == 60  # Binomial(200, 0.5) > 60 always here
        assert np.all(xb[~mask] == 0) and np.all(xb[mask] > 0)
        seen[(xb[mask, 0] - 1).astype(int)] += 1
    # Every example is kept at the same rate, 60/200 per step: within 5 standard deviations.
    sd = math.sqrt(200 * 0.3 * 0.7)
    assert np.max(np.abs(seen - 60)) < 5 * sd


def test_the_private_step_compiles_once_over_an_epoch():
    data = jbp.load_dataset("digits")
    net, opt = jbp.mlp([64, 4, 10], "tanh"), optax.sgd(0.1)
    sampler = jbp.PoissonSampler(len(data.y_train), 64, seed=0, multiple_of=32)
    step = jbp.make_dp_step(
        net, "softmax_xent", opt, max_norm=1.0, noise_multiplier=1.0,
        expected_batch_size=64, physical_batch_size=32,
    )  # fmt: skip
    state = jbp.init_state(net, opt, jax.random.key(0))
    sizes = set()
    for xb, yb, em in sampler.batches(data.x_train, data.y_train, 16):
        state, metrics = step(state, xb, yb, None, em)
        sizes.add(int(metrics["examples"]))
    assert len(sizes) > 5 and step._cache_size() == 1


# --- example masks ------------------------------------------------------------------------


def _subset_problem(seed: int, family: str):
    rng = np.random.default_rng(seed)
    p = random_problem(rng, dtype=jnp.float64, arch=family, max_depth=2, max_width=6)
    while "single example" in p.description or p.x.shape[0] < 3:
        p = random_problem(rng, dtype=jnp.float64, arch=family, max_depth=2, max_width=6)
    b = p.x.shape[0]
    keep = rng.random(b) < 0.6
    off = int(rng.integers(b))
    keep[off] = False
    keep[(off + 1 + int(rng.integers(b - 1))) % b] = True
    return p, keep


def _quantities(net, loss, max_norm):
    fns = {
        "grads": jbp.per_example_grads(net, loss),
        "norms": jbp.per_example_norms(net, loss),
        "sgs": jbp.sum_grad_squared(net, loss),
        "clipped": jbp.clipped_grad(net, loss, max_norm),
    }

    @jax.jit
    def all_of(params, x, y, mask, example_mask):
        return {k: f(params, x, y, mask=mask, example_mask=example_mask) for k, f in fns.items()}

    return all_of


@settings(max_examples=len(FAMILIES), deadline=None)
@given(st.sampled_from(FAMILIES), st.integers(0, 2**16))
@example("transformer", 163)  # a single example (T, features) once passed for a batch
def test_padding_rows_contribute_exactly_nothing_whatever_they_hold(family, seed):
    """Rows marked as padding (NaN and Inf in them) against the same batch with every row
    real: each real example's quantities are its own, the sums run over the real ones."""
    p, keep = _subset_problem(seed, family)
    x = np.array(p.x)
    if np.issubdtype(x.dtype, np.floating):
        x[~keep] = np.nan  # padding rows may hold anything
    y = np.array(p.y)
    if np.issubdtype(y.dtype, np.floating):
        y[~keep] = np.inf
    mask = None if p.mask is None else np.asarray(p.mask)
    max_norm = 0.3
    fn = _quantities(p.net, p.loss, max_norm)  # one compilation: the same shapes twice
    got = jax.device_get(fn(p.params, x, y, mask, keep))  # numpy from here on
    every = jax.device_get(fn(p.params, p.x, p.y, mask, np.ones_like(keep)))
    opts = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["norms"][keep], every["norms"][keep], **opts)
    assert np.all(got["norms"][~keep] == 0)
    real = jax.tree.map(lambda g: g[keep], every["grads"])
    for g, w in zip(jax.tree.leaves(got["grads"]), jax.tree.leaves(real), strict=True):
        np.testing.assert_allclose(g[keep], w, **opts)
        assert np.all(g[~keep] == 0)
    want_sgs = jax.tree.map(lambda g: np.sum(g * g, axis=0), real)
    for g, w in zip(jax.tree.leaves(got["sgs"]), jax.tree.leaves(want_sgs), strict=True):
        np.testing.assert_allclose(g, w, **opts)
    c = np.minimum(1.0, max_norm / every["norms"][keep])
    if jbp._losses.get_loss(p.loss).reduction == "mean":
        c = c / keep.sum()
    clipped = jax.tree.map(lambda g: np.tensordot(c, g, axes=1), real)
    for g, w in zip(jax.tree.leaves(got["clipped"][0]), jax.tree.leaves(clipped), strict=True):
        np.testing.assert_allclose(g, w, **opts)


def test_variance_noise_scale_and_dp_grad_count_the_real_examples_only():
    net, loss = jbp.mlp([5, 7, 3], "tanh"), "softmax_xent"
    params = net.init(jax.random.key(0), jnp.float64)
    x = np.random.default_rng(0).normal(size=(9, 5))
    y = np.arange(9) % 3
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1], bool)
    xn = x.copy()
    xn[~keep] = np.nan
    max_norm, e = 0.5, 6.0
    fns = {
        "var0": jbp.grad_variance(net, loss),
        "var1": jbp.grad_variance(net, loss, ddof=1),
        "gns": jbp.gradient_noise_scale(net, loss),
        "grads": jbp.per_example_grads(net, loss),
    }
    dp = jbp.dp_grad(net, loss, max_norm, 0.0, expected_batch_size=e)

    @jax.jit
    def all_of(x):
        out = {k: f(params, x, y, example_mask=keep) for k, f in fns.items()}
        return {**out, "dp": dp(params, x, y, jax.random.key(1), example_mask=keep)[0]}

    got, clean = jax.device_get(all_of(xn)), jax.device_get(all_of(x))
    # References from the real examples' own gradients (NaN-free input), in numpy.
    g = [leaf[keep].reshape(keep.sum(), -1) for leaf in jax.tree.leaves(clean["grads"])]
    flat = np.concatenate(g, axis=1)  # (n, P)
    n = keep.sum()
    mean = flat.mean(axis=0)
    for ddof, name in ((0, "var0"), (1, "var1")):
        want = (np.sum(flat**2, axis=0) - n * mean**2) / (n - ddof)
        have = np.concatenate([v.ravel() for v in jax.tree.leaves(got[name])])
        np.testing.assert_allclose(have, np.maximum(want, 0), rtol=1e-9, atol=1e-15)
    trace = n / (n - 1) * (np.mean(np.sum(flat**2, axis=1)) - mean @ mean)
    np.testing.assert_allclose(got["gns"].trace_cov, trace, rtol=1e-10)
    np.testing.assert_allclose(got["gns"].grad_sq_norm, mean @ mean - trace / n, rtol=1e-10)
    c = np.minimum(1.0, max_norm / np.linalg.norm(flat, axis=1))
    have = np.concatenate([v.ravel() for v in jax.tree.leaves(got["dp"])])
    np.testing.assert_allclose(have, c @ flat / e, rtol=1e-10, atol=1e-15)  # the sum over E


@pytest.mark.parametrize(
    ("example_mask", "error", "message"),
    [
        (np.ones(4, np.int32), TypeError, "`example_mask` must be boolean"),
        (np.ones(3, bool), ValueError, r"`example_mask` must have shape \(batch,\) = \(4,\)"),
        ("yes", TypeError, "`example_mask` must be an array, got str"),
    ],
)
def test_a_bad_example_mask_is_named(example_mask, error, message):
    net = jbp.mlp([2, 3], "tanh")
    params = net.init(jax.random.key(0))
    x, y = np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(error, match=message):
        jbp.per_example_norms(net, "half_sse")(params, x, y, example_mask=example_mask)


def test_dp_grad_refuses_the_realised_batch_size_as_divisor():
    net = jbp.mlp([2, 3], "tanh")
    params = net.init(jax.random.key(0))
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
    dp = jbp.dp_grad(net, "softmax_xent", 1.0, 1.0)
    with pytest.raises(ValueError, match="needs `expected_batch_size`"):
        dp(params, x, y, jax.random.key(0), example_mask=np.ones(4, bool))


# --- sensitivity and noise ----------------------------------------------------------------


def _adversarial(rng, net, x, y, kind):
    """One more example: huge inputs, a wrong label far from the data, or an ordinary one."""
    z = rng.normal(size=x.shape[1:])
    if kind == "huge":
        z = z * 1e6
    elif kind == "tiny":
        z = z * 1e-12
    label = int(rng.integers(y.max() + 1))
    return z, label


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(["huge", "tiny", "ordinary"]))
def test_adding_or_removing_one_example_moves_the_clipped_sum_by_at_most_c(seed, kind):
    rng = np.random.default_rng(seed)
    width = int(rng.integers(2, 9))
    net = jbp.mlp([4, width, 3], rng.choice(["tanh", "relu", "sigmoid"]))
    params = jax.tree.map(
        lambda a: a * rng.uniform(0.5, 20), net.init(jax.random.key(seed), jnp.float64)
    )
    b = 8
    x = rng.normal(size=(b, 4)) * rng.uniform(0.1, 100)
    y = rng.integers(3, size=b)
    max_norm = float(rng.uniform(0.01, 5))
    z, label = _adversarial(rng, net, x, y, kind)
    xs, ys = np.concatenate([x, z[None]]), np.concatenate([y, [label]])
    # σ = 0 and E = 1: dp_grad is the clipped sum Σ_i min(1, C/‖g_i‖) g_i itself.
    clipped_sum = jax.jit(jbp.dp_grad(net, "softmax_xent", max_norm, 0.0, expected_batch_size=1))
    key = jax.random.key(0)
    with_z = np.ones(b + 1, bool)
    s1 = clipped_sum(params, xs, ys, key, example_mask=with_z)[0]
    for out in range(b + 1):  # remove each example in turn (the last is the added one)
        without = with_z.copy()
        without[out] = False
        s0 = clipped_sum(params, xs, ys, key, example_mask=without)[0]
        diff = jax.tree.map(jnp.subtract, s1, s0)
        norm = math.sqrt(sum(float(jnp.sum(d * d)) for d in jax.tree.leaves(diff)))
        assert norm <= max_norm * (1 + 1e-9)


def test_the_noise_has_standard_deviation_sigma_c_over_the_expected_batch():
    net = jbp.mlp([30, 60, 10], "tanh")
    params = net.init(jax.random.key(0))
    x, y = np.zeros((4, 30), np.float32), np.zeros(4, np.int32)
    sigma, c, e = 1.7, 0.3, 12.5
    dp = jax.jit(jbp.dp_grad(net, "softmax_xent", c, sigma, expected_batch_size=e))
    nobody = np.zeros(4, bool)  # no example: the result is the noise alone
    noise = np.concatenate(
        [
            np.ravel(leaf)
            for leaf in jax.tree.leaves(dp(params, x, y, jax.random.key(5), example_mask=nobody)[0])
        ]
    )
    std = sigma * c / e
    assert noise.size > 2000
    assert abs(noise.std() / std - 1) < 4 / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)


# --- the ledger ---------------------------------------------------------------------------


def test_the_ledger_reproduces_published_values_and_the_accountant_called_directly():
    # PLD, q = 0.1, 512 steps, δ = 1e-6: ε = 3.77 for σ = 3, and σ = 9.66 for ε = 1.
    assert jbp.dp_epsilon(3.0, 0.1, 512, 1e-6) == pytest.approx(3.77, abs=0.005)
    sigma = jbp.dp_noise_multiplier(1.0, 1e-6, 0.1, 512)
    assert sigma == pytest.approx(9.66, abs=0.005)
    assert jbp.dp_epsilon(sigma, 0.1, 512, 1e-6) <= 1.0
    event = dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1))
    for name, make in (
        ("pld", dp_accounting.pld.PLDAccountant),
        ("rdp", dp_accounting.rdp.RdpAccountant),
    ):
        acc = make()
        acc.compose(event, 300)
        assert jbp.dp_epsilon(1.1, 0.01, 300, 1e-5, accountant=name) == acc.get_epsilon(1e-5)
    assert jbp.dp_epsilon(1.1, 0.01, 300, 1e-5, accountant="rdp") > jbp.dp_epsilon(
        1.1, 0.01, 300, 1e-5
    )
    assert jbp.dp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert jbp.dp_epsilon(0.0, 0.1, 10, 1e-5) == math.inf


def test_a_cap_near_the_expected_batch_costs_epsilon():
    # q·N = 64 of N = 1437 for 330 steps at σ = 1: a cap of 72 more than doubles the ε of 96.
    n, q = 1437, 64 / 1437
    eps = {
        cap: jbp.dp_epsilon(1.0, q, 330, 1e-5, dataset_size=n, max_batch_size=cap)
        for cap in (72, 96)
    }
    poisson = jbp.dp_epsilon(1.0, q, 330, 1e-5)
    assert eps[72] > 2 * eps[96] and eps[96] == pytest.approx(poisson, rel=0.02)
    with pytest.raises(ValueError, match="PLD accountant only"):
        jbp.dp_epsilon(1.0, q, 10, 1e-5, dataset_size=n, max_batch_size=72, accountant="rdp")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: jbp.dp_epsilon(1.0, 1.5, 10, 1e-5), r"`sampling_rate` must be in \(0, 1\]"),
        (lambda: jbp.dp_epsilon(1.0, 0.1, 10, 0.0), r"`delta` must be in \(0, 1\)"),
        (lambda: jbp.dp_epsilon(1.0, 0.1, -1, 1e-5), "`steps` must be an integer ≥ 0"),
        (
            lambda: jbp.dp_epsilon(1.0, 0.1, 10, 1e-5, accountant="moments"),
            "`accountant` must be one of",
        ),
        (lambda: jbp.dp_noise_multiplier(-1.0, 1e-5, 0.1, 10), r"`epsilon` must be in \(0, inf\)"),
        (lambda: jbp.dp_epsilon(1.0, 0.1, 10, 1e-5, max_batch_size=8), "needs `dataset_size`"),
        (lambda: jbp.Privacy(), "needs `noise_multiplier`"),
        (lambda: jbp.Privacy(epsilon=1.0, max_norm=0.0), r"`max_norm` must be in \(0, inf\)"),
        (lambda: jbp.Privacy(epsilon=1.0, physical_batch_size=0), "`physical_batch_size` must be"),
        (
            lambda: jbp.Privacy(epsilon=1.0, max_batch_size=9, accountant="rdp"),
            "PLD accountant only",
        ),
        (
            lambda: jbp.PoissonSampler(10, 20),
            r"`expected_batch_size` must be in \(0, dataset_size = 10\]",
        ),
        (lambda: jbp.PoissonSampler(10, 2, multiple_of=0), "`multiple_of` must be an integer ≥ 1"),
    ],
)
def test_bad_privacy_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --- fit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    return jbp.load_dataset("moons", n=300, seed=0, test_fraction=0.2)


def _fit(data, **kw):
    kw.setdefault("epochs", 3)
    return jbp.fit(jbp.mlp([2, 8, 2], "tanh"), "softmax_xent", optax.adam(1e-2), data,
                   batch_size=24, **kw)  # fmt: skip


def test_fit_calibrates_sigma_records_epsilon_and_writes_the_pinned_fields(small, tmp_path):
    privacy = jbp.Privacy(epsilon=2.0, delta=1e-4, max_norm=0.5, physical_batch_size=8)
    r = _fit(small, privacy=privacy, run_dir=tmp_path, check_every=5, epochs=2)
    q, steps = 24 / 240, 2 * 10
    assert r.stop_reason == "epochs" and int(r.state.step) == steps
    sigma = jbp.dp_noise_multiplier(2.0, 1e-4, q, steps)
    assert r.privacy["noise_multiplier"] == pytest.approx(sigma)
    eps = [h["epsilon"] for h in r.history]
    assert eps == [pytest.approx(jbp.dp_epsilon(sigma, q, 10 * k, 1e-4)) for k in (1, 2)]
    assert eps[0] < eps[-1] <= 2.0 and r.privacy["epsilon"] == eps[-1]
    assert all(h["grad_checks"] > 0 and h["grad_check_max_rel_err"] < 1e-4 for h in r.history)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("noise_multiplier", "sampling_rate", "max_norm", "delta", "accountant"):
        assert config[key] == r.privacy[key]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(rec["step"], rec["epsilon"]) for rec in records] == [(10, eps[0]), (20, eps[1])]


def test_a_budget_stops_before_the_step_that_would_exceed_it_and_a_resume_continues(
    small, tmp_path
):
    privacy = jbp.Privacy(noise_multiplier=1.2, epsilon=3.0, delta=1e-4, accountant="rdp")
    q = 24 / 240

    def eps(steps):
        return jbp.dp_epsilon(1.2, q, steps, 1e-4, accountant="rdp")

    whole = _fit(small, privacy=privacy, epochs=6)
    allowed = int(whole.state.step)
    assert whole.stop_reason == "privacy_budget" and 10 < allowed < 60
    assert whole.privacy["epsilon"] == eps(allowed) <= 3.0 < eps(allowed + 1)
    # The same run interrupted at step 7 and resumed: bitwise the same state and ledger.
    _fit(small, privacy=privacy, epochs=6, run_dir=tmp_path, max_steps=7)
    resumed = _fit(small, privacy=privacy, epochs=6, run_dir=tmp_path, resume=True)
    assert resumed.stop_reason == "privacy_budget" and int(resumed.state.step) == allowed
    jbp.compare(resumed.state.params, whole.state.params, rtol=0.0).raise_if_failed()
    assert resumed.privacy == whole.privacy
    assert [h["epsilon"] for h in resumed.history] == [h["epsilon"] for h in whole.history]
    with pytest.raises(ValueError, match=r"noise_multiplier = 1\.2 but this call has 1\.3"):
        again = jbp.Privacy(noise_multiplier=1.3, delta=1e-4, accountant="rdp")
        _fit(small, privacy=again, epochs=9, run_dir=tmp_path,
             resume=True)  # fmt: skip
    with pytest.raises(ValueError, match="written by a private run but this call is not"):
        _fit(small, epochs=9, run_dir=tmp_path, resume=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"privacy": {"epsilon": 1.0}}, "`privacy` must be a jbp.Privacy"),
        (
            {"privacy": jbp.Privacy(epsilon=1.0), "gradient_source": "autodiff"},
            "must be 'backprop'",
        ),
        ({"privacy": jbp.Privacy(epsilon=1.0), "batch_size": 500}, "holds only 240 examples"),
        ({"privacy": jbp.Privacy(epsilon=1.0), "patience": 2}, "on the training loss, computed"),
    ],
)
def test_fit_refuses_what_it_cannot_account_for(small, kwargs, message):
    kw = {"batch_size": 24, **kwargs}
    with pytest.raises((TypeError, ValueError), match=message):
        jbp.fit(jbp.mlp([2, 8, 2], "tanh"), "softmax_xent", optax.adam(1e-2), small, **kw)


def test_cli_trains_privately_prints_the_ledger_and_resumes(tmp_path, capsys):
    from jbp.cli import main

    run = tmp_path / "run"
    argv = ["train", "--data", "moons", "--hidden", "8", "--activation", "tanh", "--lr", "0.01",
            "--batch-size", "80", "--epochs", "3", "--dp", "--epsilon", "3", "--delta", "1e-4",
            "--max-norm", "0.5", "--physical-batch-size", "16", "--accountant", "rdp",
            "--run-dir", str(run)]  # fmt: skip
    assert main([*argv, "--max-steps", "13"]) == 0
    out = capsys.readouterr().out
    assert "private (DP-SGD): Poisson sampling, expected batch 80 of 800" in out
    assert re.search(r"epoch 1/3  step 10 .* ε \d", out)
    assert re.search(
        r"DP-SGD: σ = [\d.]+, q = 0\.1 .* 13 steps: ε = [\d.]+ at δ = 0\.0001 \(RDP", out
    )
    config = json.loads((run / "config.json").read_text())
    assert config["dp"] is True and config["sampling_rate"] == 0.1 and config["max_norm"] == 0.5
    assert main([*argv, "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backprop: test accuracy") and "after 3 epochs (30 steps)" in out
    eps = float(re.search(r"30 steps: ε = ([\d.]+)", out).group(1))
    assert 2.9 < eps <= 3.0
    assert main([*argv, "--resume", "--quiet", "--max-norm", "1"]) == 2
    assert "--max-norm is 1.0 but the run being resumed used 0.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epsilon", "3"], r"--epsilon configure private training: add --dp"),
        (["--dp"], r"--dp needs --epsilon E"),
        (
            ["--dp", "--epsilon", "3", "--gradient-source", "both"],
            "--gradient-source must be backprop",
        ),
        (["--dp", "--epsilon", "3", "--devices", "2"], "--dp runs on one device"),
        (
            ["--dp", "--epsilon", "3", "--max-batch-size", "9", "--accountant", "rdp"],
            "PLD accountant only",
        ),
    ],
)
def test_cli_bad_privacy_flags_exit_2(capsys, args, message):
    from jbp.cli import main

    assert main(["train", "--data", "xor", "--epochs", "1", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_chunks_accumulate_to_the_one_pass_step_and_padding_chunks_are_skipped():
    net = jbp.mlp([3, 6, 3], "tanh")
    opt = optax.sgd(0.3)
    state = jbp.init_state(net, opt, jax.random.key(0), dtype=jnp.float64)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 3)), rng.integers(3, size=16)
    # chunks of 4: chunk 1 and chunk 3 hold padding only, chunk 3 after the last example
    keep = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    x[~keep] = np.nan
    kw = dict(max_norm=0.2, noise_multiplier=1.3, expected_batch_size=5.0)
    one = jbp.make_dp_step(net, "softmax_xent", opt, **kw)
    chunked = jbp.make_dp_step(net, "softmax_xent", opt, physical_batch_size=4, **kw)
    a, ma = one(state, x, y, None, keep)
    b, mb = chunked(state, x, y, None, keep)
    jbp.compare(b.params, a.params, rtol=1e-12).raise_if_failed()
    assert int(mb["examples"]) == 6 and float(mb["loss"]) == pytest.approx(float(ma["loss"]))
    with pytest.raises(ValueError, match="not a multiple of `physical_batch_size` 4"):
        chunked(state, x[:14], y[:14], None, keep[:14])


def test_the_audit_bound_matches_its_closed_form_and_weakens_with_delta():
    # δ = 0 and every guess right: P[Binomial(r, q) ≥ r] = q^r = β, so ε = log(q / (1 - q)).
    q = 0.05 ** (1 / 20)
    assert jbp.audit_epsilon(100, 20, 20, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    strict, loose = jbp.audit_epsilon(1000, 100, 80, 0.0), jbp.audit_epsilon(1000, 100, 80, 1e-4)
    assert 0 < loose < strict
    assert jbp.audit_epsilon(1000, 100, 55, 1e-5) == 0.0  # no better than chance: no bound
    with pytest.raises(ValueError, match="need correct ≤ guesses ≤ canaries"):
        jbp.audit_epsilon(10, 20, 5, 1e-5)
