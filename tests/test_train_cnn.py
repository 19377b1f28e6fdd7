"""The trainer on images: fit and evaluate with a CNN, their shape errors, and
``jbp train --model cnn`` end to end (digits images and image .npz files)."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import optax
import pytest

import jbp
from jbp.cli import main


def _bars(n: int, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grayscale ``(n, size, size)`` noise with a bright row 2·label: 3 classes
    a CNN learns in a few steps."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = 0.3 * rng.normal(size=(n, size, size))
    x[np.arange(n), 2 * y, :] += 2.0
    return x, y


@pytest.fixture(scope="module")
def images_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "bars.npz"
    x, y = _bars(120)
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def bars(images_npz):
    return jbp.load_dataset(images_npz, test_fraction=0.2)  # (96 | 24, 6, 6, 1)


def _cnn(channels=4, classes=3):
    return jbp.Sequential([
        jbp.Conv(1, channels, (3, 3), "relu"),
        jbp.Conv(channels, 8, (3, 3), "relu", stride=2),
        jbp.Flatten(),
        jbp.Dense(72, classes),
    ])  # fmt: skip


def test_fit_trains_a_cnn_on_images_with_the_live_check(bars):
    assert bars.x_train.shape == (96, 6, 6, 1)
    result = jbp.fit(_cnn(), "softmax_xent", optax.adam(0.01), bars, epochs=3, batch_size=16,
                     check_every=5)  # fmt: skip
    history = result.history
    assert [r["grad_checks"] for r in history] == [2, 1, 1]  # steps 0, 5 | 10 | 15
    assert all(0.0 <= r["grad_check_max_rel_err"] <= 1e-4 for r in history)
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] >= 0.9
    # evaluate on images agrees with the params' own predictions
    ev = jbp.evaluate(_cnn(), "softmax_xent", result.state.params, bars.x_test, bars.y_test)
    out = np.asarray(_cnn().apply(result.state.params, bars.x_test))
    assert ev["accuracy"] == history[-1]["test_accuracy"] == np.mean(out.argmax(1) == bars.y_test)


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (
            jbp.mlp([36, 3]),
            r"`data.x_train` has examples of shape \(6, 6, 1\) but the network's first layers "
            r"take vectors \(fan_in,\); put jbp.Flatten\(\) first",
        ),
        (
            jbp.Sequential([jbp.Conv(3, 4, (3, 3)), jbp.Flatten(), jbp.Dense(144, 3)]),
            r"`data.x_train` has examples of shape \(6, 6, 1\), which the network cannot take: "
            r"`layers\[0\]` \(Conv\(.*expects 3 input channels",
        ),
        (
            jbp.Sequential([jbp.Conv(1, 3, (3, 3))]),
            r"the network maps one example of `data.x_train` to shape \(6, 6, 3\), but a "
            r"classifier needs one score per class, shape \(classes,\): end it with "
            r"jbp.Flatten\(\) or jbp.GlobalAvgPool\(\) and a Dense layer",
        ),
        (
            _cnn(classes=2),
            r"`data.y_train` lie in \[0, 2\] but the network's 2 outputs express classes 0..1",
        ),
    ],
)
def test_fit_rejects_networks_that_do_not_fit_the_images(bars, net, message):
    with pytest.raises(ValueError, match=message):
        jbp.fit(net, "softmax_xent", optax.sgd(0.1), bars)


def test_fit_and_evaluate_reject_flat_data_for_a_cnn():
    moons = jbp.load_dataset("moons", n=40)
    with pytest.raises(
        ValueError,
        match=r"`data.x_train` has examples of shape \(2,\) but the network's first layers "
        r"take examples \(height, width, channels\)",
    ):
        jbp.fit(_cnn(), "softmax_xent", optax.sgd(0.1), moons)
    params = _cnn().init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"`x` has examples of shape \(2,\) but the network"):
        jbp.evaluate(_cnn(), "softmax_xent", params, moons.x_test, moons.y_test)
    with pytest.raises(
        ValueError,
        match=r"`x` must have shape \(n, features\) or \(n, \*example_shape\) with n=8 \(one "
        r"example per label\), got \(8,\)",
    ):
        jbp.evaluate(_cnn(), "softmax_xent", params, np.ones(8, np.float32), np.arange(8) % 3)
    with pytest.raises(
        ValueError,
        match=r"`data.x_train` must have shape \(n, features\) or \(n, \*example_shape\) and "
        r"`data.y_train` shape \(n,\), got \(40,\) and \(32,\)",
    ):
        jbp.fit(_cnn(), "softmax_xent", optax.sgd(0.1), moons._replace(x_train=np.ones(40)))


def test_a_network_without_a_dense_end_takes_its_width_from_the_shapes(bars):
    """GlobalAvgPool last: no declared fan_out, so the classes come from output_shape."""
    net = jbp.Sequential([jbp.Conv(1, 3, (3, 3)), jbp.GlobalAvgPool()])
    assert net.fan_out is None
    params = net.init(jax.random.key(0))
    ev = jbp.evaluate(net, "mse", params, bars.x_test, bars.y_test)  # one-hot targets of width 3
    out = np.asarray(net.apply(params, bars.x_test))
    assert ev["accuracy"] == np.mean(out.argmax(1) == bars.y_test)
    want = np.mean(np.mean((out - np.eye(3)[bars.y_test]) ** 2, axis=1))
    np.testing.assert_allclose(ev["loss"], want, rtol=1e-5)
    with pytest.raises(
        ValueError,
        match=r"loss 'mse' takes one-hot targets but the network does not declare its number of "
        r"outputs \(no Dense at its end\); end it with a Dense layer",
    ):
        jbp.targets(net, "mse", bars.y_test)


# --- jbp train --model cnn ----------------------------------------------------------


def test_cli_trains_a_cnn_on_an_image_npz_and_resumes(images_npz, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(images_npz), "--model", "cnn", "--channels", "4,8",
            "--hidden", "8", "--lr", "0.01", "--batch-size", "16", "--epochs", "3",
            "--check-every", "5", "--run-dir", str(run)]  # fmt: skip
    assert main([*argv, "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "bars.npz: 96 train / 24 test examples, 6×6×1 images, 3 classes" in out
    assert "cnn: 3x3 conv [4, 8] (stride 1, then 2) + flatten + mlp [72, 8, 3] relu" in out
    assert "epoch 1/3  step 6" in out and "grad check" in out
    assert json.loads((run / "config.json").read_text())["channels"] == [4, 8]
    assert main([*argv, "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"backprop: test accuracy (\S+)%", out).group(1))
    assert accuracy >= 90.0 and "after 3 epochs (18 steps)" in out, out
    assert main([*argv, "--resume", "--channels", "4,6"]) == 2
    assert "--channels is [4, 6] but the run being resumed used [4, 8]" in capsys.readouterr().err
    assert main([*argv, "--resume", "--model", "mlp"]) == 2
    assert "--model is 'mlp' but the run being resumed used 'cnn'" in capsys.readouterr().err


def test_cli_trains_an_mlp_on_image_npz_by_flattening(images_npz, capsys):
    argv = ["train", "--data", str(images_npz), "--hidden", "8", "--lr", "0.01",
            "--epochs", "2", "--check-every", "4"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "flatten + mlp [36, 8, 3] relu" in out and "backprop: test accuracy" in out


def test_cli_cnn_on_digits_loads_the_images(capsys):
    argv = ["train", "--model", "cnn", "--channels", "4", "--hidden", "none",
            "--max-steps", "3", "--check-every", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "digits (8×8 images): 1438 train / 359 test examples, 8×8×1 images, 10 classes" in out
    assert "cnn: 3x3 conv [4] (stride 1) + flatten + mlp [256, 10] relu" in out
    assert re.search(r"backprop: test accuracy \d+\.\d\d% \(\d+/359\).*\(3 steps, stopped", out)


def test_cli_resumes_a_run_from_before_model_existed(tmp_path, capsys):
    """A config.json without "model" was an MLP run: it resumes as one."""
    run = tmp_path / "run"
    argv = ["train", "--data", "xor", "--hidden", "4", "--epochs", "1", "--quiet",
            "--run-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))
    assert main([*argv[:-2], "--epochs", "2", "--run-dir", str(run), "--resume"]) == 0
    assert "after 2 epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet"], r"argument --model: invalid choice: 'resnet' \(choose from "),
        (
            ["--model", "cnn", "--data", "moons"],
            r"--model cnn needs images, examples of shape \(height, width, channels\), but "
            r"moons\(n=1000, noise=0.1\) has examples of shape \(2,\); use --data digits or a "
            r"\.npz file",
        ),
        (
            ["--channels", "4,x"],
            r"argument --channels: expected comma-separated channel counts such as 32,64, got "
            r"'4,x'",
        ),
        (["--channels", "0"], r"argument --channels: channel counts must be at least 1, got 0"),
    ],
)
def test_cli_bad_model_arguments_exit_2(capsys, args, message):
    assert main(["train", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_model_defaults_to_mlp():
    from jbp.cli import build_parser

    args = build_parser().parse_args(["train"])
    assert (args.model, args.channels) == ("mlp", (32, 64))
