"""Data sets: the built-in ones, user .npz/.csv files (and every bad-file message),
``load_dataset`` and the seeded batch iterator."""

from __future__ import annotations

import numpy as np
import pytest

import jbp


def _check_split(data: jbp.Dataset, n: int, features: int, classes: int) -> None:
    assert data.x_train.dtype == np.float32 and data.x_test.dtype == np.float32
    assert data.y_train.dtype == np.int32 and data.y_test.dtype == np.int32
    assert data.x_train.shape[1] == data.x_test.shape[1] == data.n_features == features
    assert data.x_train.shape[0] == data.y_train.shape[0]
    assert data.x_test.shape[0] == data.y_test.shape[0]
    assert data.x_train.shape[0] + data.x_test.shape[0] == n
    assert data.n_classes == classes
    labels = np.concatenate([data.y_train, data.y_test])
    assert set(np.unique(labels)) == set(range(classes))


def _assert_same(a: jbp.Dataset, b: jbp.Dataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_xor_is_the_truth_table():
    data = jbp.load_dataset("xor")
    x = data.x_train.astype(int)
    np.testing.assert_array_equal(data.y_train, x[:, 0] ^ x[:, 1])
    np.testing.assert_array_equal(data.x_test, data.x_train)
    assert data.n_classes == 2 and data.n_features == 2


@pytest.mark.parametrize(
    ("name", "options", "classes"),
    [("moons", {}, 2), ("spirals", {}, 3), ("spirals", {"classes": 5}, 5)],
)
def test_generated_sets_are_seeded_split_and_standardised(name, options, classes):
    data = jbp.load_dataset(name, n=300, seed=3, test_fraction=0.25, **options)
    _check_split(data, 300, 2, classes)
    assert data.x_test.shape[0] == 75
    # standardised with the training split's statistics
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1.0, atol=1e-5)
    _assert_same(data, jbp.load_dataset(name, n=300, seed=3, test_fraction=0.25, **options))
    other = jbp.load_dataset(name, n=300, seed=4, test_fraction=0.25, **options)
    assert not np.array_equal(data.x_train, other.x_train)


def test_classes_are_balanced():
    moons = jbp.load_dataset("moons", n=300)
    spirals = jbp.load_dataset("spirals", n=300, classes=3)
    for data, classes in ((moons, 2), (spirals, 3)):
        labels = np.concatenate([data.y_train, data.y_test])
        assert np.bincount(labels).tolist() == [300 // classes] * classes


def test_digits_ships_with_scikit_learn():
    data = jbp.load_dataset("digits", seed=1)
    _check_split(data, 1797, 64, 10)
    assert data.x_test.shape[0] == round(0.2 * 1797)
    train_std = data.x_train.std(axis=0)
    # constant pixels (std 0) stay 0; every other column has unit variance on train
    np.testing.assert_allclose(train_std[train_std > 0], 1.0, atol=1e-4)
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert not np.allclose(data.x_test.mean(axis=0), 0.0, atol=1e-5)  # test stats not used
    _assert_same(data, jbp.load_dataset("digits", seed=1))
    raw = jbp.load_dataset("digits", seed=1, standardize=False)
    assert raw.x_train.min() == 0 and raw.x_train.max() == 16


def test_dataset_names():
    assert jbp.dataset_names() == (
        "digits",
        "majority",
        "moons",
        "sort",
        "spirals",
        "stdlib",
        "xor",
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown data set 'mnist'; known: digits, majority, moons, sort, spirals, stdlib, xor, or a path",
    ):
        jbp.load_dataset("mnist")


def test_unknown_option_names_what_the_loader_accepts():
    with pytest.raises(
        TypeError,
        match=r"load_dataset\('moons'\) got unknown options \['classes'\]; it accepts: n, noise",
    ):
        jbp.load_dataset("moons", classes=3)
    with pytest.raises(
        TypeError, match=r"load_dataset\('xor'\) got unknown options \['n'\]; it accepts: none"
    ):
        jbp.load_dataset("xor", n=4)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2,0\n")
    with pytest.raises(
        ValueError, match=r"data.txt: unsupported file type '.txt'; use a .npz or .csv file"
    ):
        jbp.load_dataset(path)


def test_name_must_be_a_string_or_path():
    with pytest.raises(TypeError, match="`name` must be a data set name or a file path, got int"):
        jbp.load_dataset(3)


def test_test_fraction_is_checked():
    with pytest.raises(ValueError, match=r"`test_fraction` must be in \[0, 1\), got 1.0"):
        jbp.load_dataset("moons", test_fraction=1.0)
    with pytest.raises(ValueError, match="puts all 2 examples in the test split"):
        jbp.load_dataset("moons", n=2, test_fraction=0.9)


# --- user files ---------------------------------------------------------------


def _xy(n=20, features=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)), np.arange(n) % classes


def test_npz_round_trip(tmp_path):
    x, y = _xy()
    path = tmp_path / "mine.npz"
    np.savez(path, features=x, labels=y)
    data = jbp.load_dataset(path, x_key="features", y_key="labels", test_fraction=0.25, seed=2)
    _check_split(data, 20, 3, 3)
    assert data.name == "mine.npz"
    # the split is a permutation: every example appears once, with its label
    xs = np.concatenate([data.x_train, data.x_test])
    ys = np.concatenate([data.y_train, data.y_test])
    raw = jbp.load_dataset(path, x_key="features", y_key="labels", test_fraction=0.25,
                           seed=2, standardize=False)  # fmt: skip
    raw_xs = np.concatenate([raw.x_train, raw.x_test])
    order = [int(np.flatnonzero(np.all(np.isclose(x, r, atol=1e-6), axis=1))[0]) for r in raw_xs]
    assert sorted(order) == list(range(20))
    np.testing.assert_array_equal(ys, y[order])
    assert xs.shape == raw_xs.shape


def test_csv_round_trip_with_header_and_label_column(tmp_path):
    x, y = _xy(n=12, features=2, classes=2)
    path = tmp_path / "mine.csv"
    lines = ["label,a,b"] + [
        f"{label},{float(a)!r},{float(b)!r}" for label, (a, b) in zip(y, x, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    data = jbp.load_dataset(path, label_column=0, test_fraction=0.0, standardize=False)
    assert data.x_test.shape == (0, 2)
    order = [
        int(np.flatnonzero(np.all(np.isclose(x, r, atol=1e-6), axis=1))[0]) for r in data.x_train
    ]
    assert sorted(order) == list(range(12))
    np.testing.assert_array_equal(data.y_train, y[order])


def _npz(tmp_path, name="bad.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _csv(tmp_path, text, name="bad.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "absent.npz", r"absent.npz: no such file"),
        (
            lambda p: _csv(p, "not a zip file at all", "text.npz"),
            r"text.npz: not a readable .npz file",
        ),
        (
            lambda p: _truncated(p),
            r"cut.npz: not a readable .npz file|cut.npz: could not read arrays",
        ),
        (
            lambda p: _single_npy(p),
            r"one.npz: holds a single array, not an .npz archive with 'x' and 'y'",
        ),
        (
            lambda p: _npz(p, x=np.ones((4, 2))),
            r"bad.npz: missing arrays \['y'\]; the file has \['x'\]",
        ),
        (
            lambda p: _npz(p, x=np.array(["a", "b"]), y=np.array([0, 1])),
            r"bad.npz: could not read arrays \(ValueError",
        ),
        (
            lambda p: _npz(p, x=np.array([1, 2], dtype=object), y=np.array([0, 1])),
            r"bad.npz: could not read arrays \(ValueError",
        ),
        (
            lambda p: _npz(p, x=np.ones(4), y=np.zeros(4)),
            r"bad.npz: features must be 2-D \(examples, features\), got shape \(4,\)",
        ),
        (
            lambda p: _npz(p, x=np.ones((4, 2)), y=np.zeros((4, 1))),
            r"bad.npz: labels must be 1-D with one per example \(4\), got shape \(4, 1\)",
        ),
        (
            lambda p: _npz(p, x=np.ones((4, 2)), y=np.zeros(3)),
            r"labels must be 1-D with one per example \(4\), got shape \(3,\)",
        ),
        (
            lambda p: _npz(p, x=np.array([[1.0, np.nan], [0, 0]]), y=np.array([0, 1])),
            r"bad.npz: features contain NaN or Inf",
        ),
        (
            lambda p: _npz(p, x=np.ones((2, 2)), y=np.array([0, 1.5])),
            r"bad.npz: labels must be non-negative integers",
        ),
        (
            lambda p: _npz(p, x=np.ones((2, 2)), y=np.array([0, -1])),
            r"bad.npz: labels must be non-negative integers",
        ),
        (
            lambda p: _npz(p, x=np.ones((1, 2)), y=np.array([0])),
            r"bad.npz: need at least 2 examples, got 1",
        ),
    ],
)
def test_bad_npz_files(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        jbp.load_dataset(make(tmp_path))


def _truncated(tmp_path):
    x, y = _xy()
    good = _npz(tmp_path, "good.npz", x=x, y=y)
    path = tmp_path / "cut.npz"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return path


def _single_npy(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.ones((3, 2)))
    return path


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("", {}, r"bad.csv: no data rows"),
        ("a,b,label\n", {}, r"bad.csv: no data rows"),
        ("1,2,0\n3,4\n", {}, r"bad.csv: row 2 has 2 columns, expected 3"),
        ("a,b,label\n1,2,0\n3,4,1,5\n", {}, r"bad.csv: row 3 has 4 columns, expected 3"),
        ("0\n1\n", {}, r"bad.csv: need at least one feature column and a label column"),
        (
            "1,2,0\n3,x,1\n",
            {},
            r"bad.csv: non-numeric value \(could not convert string to float: 'x'\)",
        ),
        ("1,nan,0\n3,4,1\n", {}, r"bad.csv: features contain NaN or Inf"),
        ("1,2,0.5\n3,4,1\n", {}, r"bad.csv: labels must be non-negative integers"),
        ("1,2,-1\n3,4,1\n", {}, r"bad.csv: labels must be non-negative integers"),
        ("1,2,0\n", {}, r"bad.csv: need at least 2 examples, got 1"),
        (
            "1,2,0\n3,4,1\n",
            {"label_column": 3},
            r"`label_column`=3 is out of range for .*bad.csv, which has 3 columns",
        ),
        ("1,2,0\n3,4,1\n", {"label_column": -4}, r"`label_column`=-4 is out of range"),
    ],
)
def test_bad_csv_files(tmp_path, text, options, message):
    with pytest.raises(ValueError, match=message):
        jbp.load_dataset(_csv(tmp_path, text), **options)


def test_csv_missing_and_binary_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent.csv: no such file"):
        jbp.load_dataset(tmp_path / "absent.csv")
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81" * 8)
    with pytest.raises(ValueError, match=r"binary.csv: not a text CSV file"):
        jbp.load_dataset(path)


def test_csv_header_can_be_forced(tmp_path):
    path = _csv(tmp_path, "1,2,0\n3,4,1\n5,6,1\n", "numbers.csv")
    assert jbp.load_dataset(path, test_fraction=0.0).x_train.shape == (3, 2)
    assert jbp.load_dataset(path, test_fraction=0.0, header=True).x_train.shape == (2, 2)


# --- batches --------------------------------------------------------------------


def test_batches_cover_each_example_once_in_a_seeded_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    got = list(jbp.batches(x, y, 4, seed=1, epoch=0))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    seen = np.concatenate([b[1] for b in got])
    assert sorted(seen) == list(range(10))
    for bx, by in got:
        np.testing.assert_array_equal(bx[:, 0], by)  # rows stay paired
    again = np.concatenate([b[1] for b in jbp.batches(x, y, 4, seed=1, epoch=0)])
    np.testing.assert_array_equal(seen, again)
    other_epoch = np.concatenate([b[1] for b in jbp.batches(x, y, 4, seed=1, epoch=1)])
    other_seed = np.concatenate([b[1] for b in jbp.batches(x, y, 4, seed=2, epoch=0)])
    assert not np.array_equal(seen, other_epoch)
    assert not np.array_equal(seen, other_seed)


def test_batches_drop_last_and_no_shuffle():
    x, y = np.zeros((10, 1)), np.arange(10)
    assert [len(b) for _, b in jbp.batches(x, y, 4, seed=0, drop_last=True)] == [4, 4]
    ordered = np.concatenate([b for _, b in jbp.batches(x, y, 3, seed=0, shuffle=False)])
    np.testing.assert_array_equal(ordered, np.arange(10))


def test_batches_bad_arguments():
    x, y = np.zeros((10, 1)), np.arange(9)
    with pytest.raises(ValueError, match="`x` has 10 examples but `y` has 9"):
        next(jbp.batches(x, y, 4, seed=0))
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        next(jbp.batches(x, np.arange(10), 0, seed=0))


# --- images ---------------------------------------------------------------------


def test_digits_as_images_are_the_same_examples_split_and_labels():
    flat = jbp.load_dataset("digits", seed=1, standardize=False)
    images = jbp.load_dataset("digits", seed=1, standardize=False, images=True)
    assert images.x_train.shape == (flat.x_train.shape[0], 8, 8, 1)
    assert images.x_test.shape == (flat.x_test.shape[0], 8, 8, 1)
    assert images.input_shape == (8, 8, 1) and flat.input_shape == (64,)
    assert images.n_features == flat.n_features == 64
    assert images.x_train.dtype == np.float32 and images.n_classes == 10
    for split in ("train", "test"):  # row-major pixels: the image is the flat row reshaped
        np.testing.assert_array_equal(
            getattr(images, f"x_{split}").reshape(-1, 64), getattr(flat, f"x_{split}")
        )
        np.testing.assert_array_equal(getattr(images, f"y_{split}"), getattr(flat, f"y_{split}"))


def test_digit_images_are_standardised_over_all_training_pixels():
    data = jbp.load_dataset("digits", seed=1, images=True)
    raw = jbp.load_dataset("digits", seed=1, images=True, standardize=False)
    # one mean and std over every pixel of the training images, not per pixel
    assert abs(float(data.x_train.mean())) < 1e-5
    assert abs(float(data.x_train.std()) - 1.0) < 1e-5
    mean, std = raw.x_train.astype(np.float64).mean(), raw.x_train.astype(np.float64).std()
    np.testing.assert_allclose(data.x_test, (raw.x_test - mean) / std, rtol=1e-5, atol=1e-5)
    # a pixel that is always 0 (the corners) is one value, not left at 0 as per-pixel scaling does
    corner = data.x_train[:, 0, 0, 0]
    assert np.all(corner == corner[0]) and corner[0] < -0.5
    # the flat form keeps today's per-pixel standardisation
    flat = jbp.load_dataset("digits", seed=1)
    np.testing.assert_allclose(flat.x_train.mean(axis=0), 0.0, atol=1e-5)


def test_images_is_a_digits_option_only():
    with pytest.raises(TypeError, match=r"`images` must be True or False, got 'yes'"):
        jbp.load_dataset("digits", images="yes")
    with pytest.raises(
        TypeError,
        match=r"load_dataset\('moons'\) got unknown options \['images'\]; it accepts: n, noise",
    ):
        jbp.load_dataset("moons", images=True)


def test_npz_images_get_a_channel_axis_and_keep_their_labels(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5, 4))  # (n, height, width): grayscale images
    y = np.arange(20) % 2
    path = _npz(tmp_path, "gray.npz", x=x, y=y)
    data = jbp.load_dataset(path, test_fraction=0.25, standardize=False)
    assert data.x_train.shape == (15, 5, 4, 1) and data.input_shape == (5, 4, 1)
    assert data.n_features == 20
    # the same split as the flat file of the same examples, pixel for pixel
    flat = jbp.load_dataset(
        _npz(tmp_path, "flat.npz", x=x.reshape(20, -1), y=y), test_fraction=0.25, standardize=False
    )
    np.testing.assert_array_equal(data.x_train.reshape(15, -1), flat.x_train)
    np.testing.assert_array_equal(data.y_test, flat.y_test)
    kept = jbp.load_dataset(path, add_channel=False, standardize=False)
    assert kept.input_shape == (5, 4)  # e.g. signals (length, channels)
    signal = jbp.load_dataset(_npz(tmp_path, "sig.npz", x=x[:, :, 0], y=y), add_channel=True)
    assert signal.input_shape == (5, 1)


def test_npz_colour_images_are_standardised_per_channel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 3, 3, 2)) * np.array([1.0, 10.0]) + np.array([5.0, -3.0])
    data = jbp.load_dataset(
        _npz(tmp_path, "rgb.npz", x=x, y=np.arange(40) % 4), test_fraction=0.25, seed=2
    )
    assert data.input_shape == (3, 3, 2)  # rank 4: kept as it is
    np.testing.assert_allclose(data.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=(0, 1, 2)), 1.0, atol=1e-5)
    # per channel, not per pixel: one pixel's values across the training images are not 0-mean
    assert np.max(np.abs(data.x_train.mean(axis=0))) > 0.05


def test_npz_add_channel_must_be_a_bool_or_none(tmp_path):
    path = _npz(tmp_path, "gray.npz", x=np.ones((4, 2, 2)), y=np.arange(4) % 2)
    with pytest.raises(TypeError, match=r"`add_channel` must be True, False or None, got 1"):
        jbp.load_dataset(path, add_channel=1)
    with pytest.raises(
        ValueError,
        match=r"bad.npz: features must be 2-D \(examples, features\), got shape \(4,\); images "
        r"may be \(examples, height, width\) or \(examples, height, width, channels\)",
    ):
        jbp.load_dataset(_npz(tmp_path, x=np.ones(4), y=np.zeros(4)))
