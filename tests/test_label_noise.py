"""Label-noise detection by per-example gradient norms: ranking metrics, the study, the CLI."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jbp
from jbp.cli import main


def _pairwise_auroc(scores, positives):
    """P(score of a positive > score of a negative), ties ½, by brute force."""
    pos = [s for s, p in zip(scores, positives, strict=True) if p]
    neg = [s for s, p in zip(scores, positives, strict=True) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=40))
def test_auroc_is_the_pairwise_win_rate_with_ties(pairs):
    scores = np.array([s for s, _ in pairs], float)
    positives = np.array([p for _, p in pairs])
    got = jbp.auroc(scores, positives)
    if positives.all() or not positives.any():
        assert np.isnan(got)
    else:
        assert got == pytest.approx(_pairwise_auroc(scores, positives), abs=1e-12)


def test_auroc_and_precision_on_known_rankings():
    positives = np.array([True, True, False, False, False])
    assert jbp.auroc([5.0, 4.0, 3.0, 2.0, 1.0], positives) == 1.0
    assert jbp.auroc([1.0, 2.0, 3.0, 4.0, 5.0], positives) == 0.0
    assert jbp.precision_at_k([5.0, 1.0, 4.0, 2.0, 3.0], positives, 2) == 0.5
    assert jbp.precision_at_k([5.0, 1.0, 4.0, 2.0, 3.0], positives, 1) == 1.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: jbp.auroc([1.0, 2.0], [1, 0]), TypeError, "`positives` must be a boolean mask"),
        (lambda: jbp.auroc([1.0], [True, False]), ValueError, "must be 1-D of one length"),
        (lambda: jbp.auroc([np.nan, 1.0], [True, False]), ValueError, "contain NaN or Inf"),
        (
            lambda: jbp.precision_at_k([1.0, 2.0], [True, False], 3),
            ValueError,
            r"`k` must be an int in \[1, 2\], got 3",
        ),
        (
            lambda: jbp.flip_labels([0, 1, 2], 0.5, 2, seed=0),
            ValueError,
            r"`labels` lie in \[0, 2\], outside \[0, 1\]",
        ),
        (
            lambda: jbp.flip_labels([0.0, 1.0], 0.5, 2, seed=0),
            ValueError,
            "`labels` must be integer class labels",
        ),
        (
            lambda: jbp.flip_labels([0, 1], 1.5, 2, seed=0),
            ValueError,
            r"`fraction` must be a number in \[0, 1\], got 1.5",
        ),
        (
            lambda: jbp.flip_labels([0, 1], 0.5, 1, seed=0),
            ValueError,
            "`n_classes` must be an int >= 2",
        ),
    ],
)
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_flip_labels_flips_exactly_the_share_to_other_classes():
    labels = np.arange(2000) % 10
    noisy, flipped = jbp.flip_labels(labels, 0.1, 10, seed=3)
    assert flipped.sum() == 200
    assert np.all(noisy[flipped] != labels[flipped])
    assert np.all(noisy[~flipped] == labels[~flipped])
    # Each wrong class is about equally likely: 200 flips over 9 classes.
    shift = (noisy[flipped] - labels[flipped]) % 10
    counts = np.bincount(shift, minlength=10)
    assert counts[0] == 0 and counts[1:].min() >= 8
    again, _ = jbp.flip_labels(labels, 0.1, 10, seed=3)
    assert np.array_equal(noisy, again)


def test_study_scores_are_per_example_norms_and_find_the_flips():
    data = jbp.load_dataset("moons", n=400, noise=0.1, seed=1)
    study = jbp.label_noise_study(
        data,
        noise=0.1,
        hidden=(16,),
        epochs=4,
        batch_size=16,
        learning_rate=1e-2,
        seed=1,
        top_ks=(5,),
    )
    assert len(study.history) == 4 and study.history[-1]["step"] == 4 * 20
    # The scores are what jbp.per_example_norms gives for the final params.
    x = jnp.asarray(data.x_train)
    norms = jax.jit(jbp.per_example_norms(study.net, "softmax_xent"))(study.params, x, study.labels)
    np.testing.assert_allclose(study.norms, norms, rtol=1e-5)
    assert study.auroc_norm == jbp.auroc(study.norms, study.flipped)
    assert study.history[-1]["auroc_norm"] == study.auroc_norm
    n_flipped = int(study.flipped.sum())
    assert set(study.precision) == {5, n_flipped}
    # Two clean moons: a flipped label sits in the other class's region, so its
    # gradient is large; the ranking must beat chance by far.
    assert study.auroc_norm > 0.9
    assert np.mean(study.norms[study.flipped]) > 2 * np.mean(study.norms[~study.flipped])
    top = study.top(3)
    assert [t[1] for t in top] == sorted(study.norms, reverse=True)[:3]
    # B_simple is the training set's exact noise scale: tr(Σ)/‖G‖², both ≥ 0.
    for r in study.history:
        assert r["trace_cov"] >= 0 and r["grad_sq_norm"] >= 0
        assert r["b_simple"] == pytest.approx(r["trace_cov"] / r["grad_sq_norm"], rel=1e-5)


def test_study_noise_scale_matches_vmap_grad_on_the_training_set():
    data = jbp.load_dataset("spirals", n=120, seed=2)
    study = jbp.label_noise_study(data, hidden=(8,), epochs=1, seed=2)
    ref = jax.jit(
        jax.vmap(
            jax.grad(jbp.objective(study.net, "softmax_xent")),  # reference
            in_axes=(None, 0, 0),
        )
    )(study.params, jnp.asarray(data.x_train), study.labels)
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(ref)]  # numpy from here on
    mean_sq = sum(float(np.sum(np.mean(g, axis=0) ** 2)) for g in leaves)
    trace = sum(float(np.sum(np.var(g, axis=0))) for g in leaves)
    assert study.history[-1]["grad_sq_norm"] == pytest.approx(mean_sq, rel=1e-3)
    assert study.history[-1]["trace_cov"] == pytest.approx(trace, rel=1e-3)


def test_cli_end_to_end(tmp_path, capsys):
    path = tmp_path / "out" / "summary.json"
    argv = [
        "per-example",
        "--data",
        "moons",
        "--hidden",
        "8",
        "--epochs",
        "2",
        "--top-k",
        "3",
        "--out",
        str(tmp_path / "plots"),
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "jbp per-example: moons" in out and "10% of labels flipped; MLP 2-8-2 relu" in out
    assert out.count("epoch ") == 2
    assert "flipped labels found by ranking on ‖g_i‖: AUROC " in out
    assert "top 3 by per-example gradient norm:" in out
    for name in ("label_noise_hist.png", "label_noise_training.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(path.read_text())
    assert summary["n_flipped"] == 80 and len(summary["top"]) == 3
    assert 0.0 <= summary["auroc_norm"] <= 1.0 and len(summary["history"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--noise", "1.5"], "argument --noise: must lie strictly between 0 and 1, got 1.5"),
        (["--data", "nope"], "--data: unknown data set 'nope'; known: "),
        (["--activation", "nope"], "unknown activation 'nope'"),
        (["--hidden", "8,x"], "expected comma-separated layer widths"),
    ],
)
def test_cli_bad_arguments(capsys, argv, message):
    assert main(["per-example", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: jbp per-example")
    assert message in err
