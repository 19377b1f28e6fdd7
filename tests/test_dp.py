"""The DP-SGD step: clipping without per-example gradients, Gaussian noise from the state's key."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp


def _problem(batch=16, dtype=jnp.float64):
    net = jbp.mlp([6, 40, 40, 3], "tanh")
    x = 2 * jax.random.normal(jax.random.key(1), (batch, 6), dtype)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 3)
    return net, x, y


def _reference_clipped(net, params, x, y, max_norm):
    """Σ_i min(1, C/‖g_i‖) g_i / B from vmap(jax.grad): the explicit clip-then-sum
    (the g_i compiled in one program, the clipping and the sum in numpy)."""
    grad = jax.grad(jbp.objective(net, "softmax_xent"))  # reference
    g = jax.device_get(jax.jit(jax.vmap(grad, in_axes=(None, 0, 0)))(params, x, y))
    leaves = jax.tree.leaves(g)
    norms = np.sqrt(sum(np.sum(leaf.reshape(x.shape[0], -1) ** 2, axis=1) for leaf in leaves))
    c = np.minimum(1.0, max_norm / norms) / x.shape[0]
    return jax.tree.map(lambda leaf: np.tensordot(c, leaf, axes=1), g), norms


def test_without_noise_the_step_applies_the_clipped_gradient():
    net, x, y = _problem()
    opt = optax.sgd(0.5)
    state = jbp.init_state(net, opt, jax.random.key(0), dtype=jnp.float64)
    max_norm = 0.05
    step = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=max_norm, noise_multiplier=0.0)
    new, metrics = step(state, x, y)
    clipped, norms = _reference_clipped(net, state.params, x, y, max_norm)
    want = jax.tree.map(lambda p, g: np.asarray(p) - 0.5 * g, state.params, clipped)
    jbp.compare(new.params, want, rtol=1e-12).raise_if_failed()
    share = float(np.mean(norms > max_norm))
    assert 0 < share and float(metrics["clipped"]) == pytest.approx(share)
    assert float(metrics["mean_example_norm"]) == pytest.approx(float(np.mean(norms)), rel=1e-12)
    assert float(metrics["loss"]) == pytest.approx(
        float(jax.jit(jbp.objective(net, "softmax_xent"))(state.params, x, y)), rel=1e-12
    )


def test_with_a_large_max_norm_and_no_noise_it_is_the_plain_step():
    net, x, y = _problem()
    opt = optax.adam(1e-2)
    state = jbp.init_state(net, opt, jax.random.key(0), dtype=jnp.float64)
    dp = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=1e9, noise_multiplier=0.0)
    plain = jbp.make_step(net, "softmax_xent", opt)
    a, b = state, state
    for _ in range(3):
        a, ma = dp(a, x, y)
        b, _ = plain(b, x, y)
    jbp.compare(a.params, b.params, rtol=1e-12).raise_if_failed()
    assert float(ma["clipped"]) == 0.0


def test_the_noise_has_the_dp_sgd_scale_and_comes_from_the_state_key():
    net, x, y = _problem(batch=8)
    opt = optax.sgd(1.0)
    state = jbp.init_state(net, opt, jax.random.key(0), dtype=jnp.float64)
    max_norm, sigma = 0.5, 2.0
    clean, _ = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=max_norm, noise_multiplier=0.0)(
        state, x, y
    )
    step = jbp.make_dp_step(net, "softmax_xent", opt, max_norm=max_norm, noise_multiplier=sigma)
    noisy, _ = step(state, x, y)
    noise = np.concatenate(
        [
            np.ravel(a - b)
            for a, b in zip(
                jax.tree.leaves(clean.params), jax.tree.leaves(noisy.params), strict=True
            )
        ]
    )
    # sgd(1): params differ by exactly the noise, N(0, (σ·C/B)²) per coordinate (mean loss).
    expected = sigma * max_norm / x.shape[0]
    assert noise.size > 1500
    assert abs(noise.std() / expected - 1) < 4 / math.sqrt(2 * noise.size)
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)
    again, _ = step(state, x, y)  # same state, same key: the same noise
    jbp.compare(again.params, noisy.params, rtol=0.0).raise_if_failed()
    later, _ = step(noisy._replace(params=state.params, opt_state=state.opt_state), x, y)
    assert not jbp.compare(later.params, noisy.params).ok  # the next key: new noise


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_norm=math.inf, noise_multiplier=1.0), "`max_norm` must be finite for DP-SGD"),
        (dict(max_norm=0.0, noise_multiplier=1.0), "`max_norm` must be positive"),
        (dict(max_norm=1.0, noise_multiplier=-1.0), "`noise_multiplier` must be a number ≥ 0"),
    ],
)
def test_bad_arguments(kwargs, message):
    net, _, _ = _problem()
    with pytest.raises(ValueError, match=message):
        jbp.make_dp_step(net, "softmax_xent", optax.sgd(0.1), **kwargs)
