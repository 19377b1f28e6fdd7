"""Offline data sets and a seeded batch iterator.

Generated: :func:`xor`, :func:`moons`, :func:`spirals` (seeded). Real:
:func:`digits`, scikit-learn's shipped 8×8 handwritten digits (1797 images,
10 classes; no download), split and standardised, as 64 features or as
``(8, 8, 1)`` images. Sequences: :func:`sort_digits` (seeded), sorting digits
as next-token prediction. User data: :func:`load_npz` (flat features or
images) and :func:`load_csv`. Every data set is a :class:`Dataset` of float32
inputs and integer labels (``y`` as class indices), except the sequence data
sets: int32 tokens ``(n, T)`` and labels per position ``(n, T)``, with
:data:`IGNORE_LABEL` where a position has no target. :func:`load_dataset` is
the one public entry point: a name or a path.

Images are channels last, ``(n, height, width, channels)``, as everywhere in
jbp. Standardisation uses the training split's statistics only: per feature
for flat data, per channel (one mean and standard deviation over every pixel
of the training images) for images.
"""

from __future__ import annotations

import csv
import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = -1
"""The label of a sequence position that has no target: the trainer gives it a
zero target row (no loss, δ = 0) and leaves it out of the accuracy."""


class Dataset(NamedTuple):
    """A train/test split.

    Attributes:
      x_train: ``(n_train, *input_shape)`` float32: ``(n_train, features)``
        for flat data, ``(n_train, height, width, channels)`` for images; for
        a sequence data set int32 tokens ``(n_train, T)`` in ``[0, n_classes)``.
      y_train: ``(n_train,)`` int32 class labels; for a sequence data set
        ``(n_train, T)`` int32 labels per position (the next token), each in
        ``[0, n_classes)`` or :data:`IGNORE_LABEL` (-1: no target there).
      x_test: ``(n_test, *input_shape)``, like ``x_train``.
      y_test: ``(n_test,)`` or ``(n_test, T)`` int32, like ``y_train``.
      n_classes: number of classes; for a sequence data set the vocabulary
        (tokens and labels share it).
      name: a short description.
      mask_train, mask_test: for padded sequences, the padding masks ``(n, T)``
        (True at real positions, each row a prefix); None when every position
        is real. :func:`jbp.fit` hands each batch's rows to every call.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str
    mask_train: np.ndarray | None = None
    mask_test: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input example: ``(features,)`` for flat data,
        ``(height, width, channels)`` for images."""
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        """The number of input values in one example, ``prod(input_shape)``:
        the features of flat data, ``height·width·channels`` of images (the
        width an MLP sees after ``jbp.Flatten``)."""
        return math.prod(self.input_shape)

    @property
    def is_sequence(self) -> bool:
        """Whether the labels are per position, ``y`` ``(n, T)`` (a sequence
        data set: ``x`` holds integer tokens ``(n, T)``), rather than one class
        per example, ``y`` ``(n,)``."""
        return self.y_train.ndim > 1


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, standardize: bool, name: str
) -> Dataset:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in [0, 1), got {test_fraction!r}")
    n = x.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_test = round(test_fraction * n)
    if n_test >= n:
        raise ValueError(
            f"`test_fraction`={test_fraction!r} puts all {n} examples in the test split; "
            "leave at least one for training"
        )
    test, train = order[:n_test], order[n_test:]
    x = x.astype(np.float64)
    if standardize:
        x = _standardize(x, train)
    y = y.astype(np.int32)
    n_classes = int(y.max()) + 1 if y.size else 0
    return Dataset(
        x[train].astype(np.float32), y[train], x[test].astype(np.float32), y[test], n_classes, name
    )


def _standardize(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Zero mean and unit variance on the ``train`` rows: per feature for flat
    ``(n, features)``; per channel, over every position, for ``(n, ..., channels)``.
    A constant feature or channel (standard deviation 0) is only centred."""
    axes = 0 if x.ndim == 2 else tuple(range(x.ndim - 1))
    mean = x[train].mean(axis=axes)
    std = x[train].std(axis=axes)
    return (x - mean) / np.where(std > 0, std, 1.0)


def xor() -> Dataset:
    """The four XOR points; train and test are the same four points.

    ``x`` is ``{0,1}²`` and the label is ``x₁ XOR x₂`` (use ``one_hot`` or
    ``y[:, None]`` as a float target for ``half_sse``).
    """
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
    y = np.array([0, 1, 1, 0], np.int32)
    return Dataset(x, y, x.copy(), y.copy(), 2, "xor")


def moons(
    n: int = 1000, *, noise: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """Two interleaved half circles with Gaussian noise, standardised."""
    if n < 2:
        raise ValueError(f"`n` must be at least 2, got {n}")
    rng = np.random.default_rng(seed)
    n0 = n // 2
    t0, t1 = rng.uniform(0, np.pi, n0), rng.uniform(0, np.pi, n - n0)
    a = np.stack([np.cos(t0), np.sin(t0)], axis=1)
    b = np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], axis=1)
    x = np.concatenate([a, b]) + noise * rng.normal(size=(n, 2))
    y = np.concatenate([np.zeros(n0), np.ones(n - n0)])
    return _split(x, y, test_fraction, seed, True, f"moons(n={n}, noise={noise})")


def spirals(
    n: int = 1000,
    *,
    classes: int = 3,
    noise: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """``classes`` interleaved spiral arms in the plane, standardised."""
    if classes < 2:
        raise ValueError(f"`classes` must be at least 2, got {classes}")
    rng = np.random.default_rng(seed)
    label = np.arange(n) % classes
    r = rng.uniform(0.05, 1.0, n)
    theta = 4.0 * r + 2 * np.pi * label / classes + noise * rng.normal(size=n)
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    return _split(x, label, test_fraction, seed, True, f"spirals(n={n}, classes={classes})")


def digits(
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    images: bool = False,
    rows: bool = False,
) -> Dataset:
    """scikit-learn's 8×8 digits (1797 examples, 10 classes), split and standardised.

    Args:
      test_fraction, seed: the split (the same examples and labels in both forms).
      standardize: zero mean, unit variance with the training split's statistics.
      images: ``False`` (default): 64 features per example, ``(n, 64)``,
        standardised per pixel. ``True``: ``(n, 8, 8, 1)`` images, channels
        last, standardised with one mean and standard deviation over all
        pixels of the training images (per channel; digits have one), so
        every pixel keeps its place on one scale, as a convolution expects.
      rows: ``True``: each image read row by row as a sequence of 8 steps of 8
        pixels, ``(n, 8, 8)`` (standardised per pixel, as the 64 features), for
        recurrent networks.
    """
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    for flag, value in (("images", images), ("rows", rows)):
        if not isinstance(value, bool):
            raise TypeError(f"`{flag}` must be True or False, got {value!r}")
    if images and rows:
        raise ValueError("`images` and `rows` are two forms of digits: give one of them")
    data = load_digits()
    if rows:
        flat = _split(data.data, data.target, test_fraction, seed, standardize, "digits (8 rows)")
        return flat._replace(
            x_train=flat.x_train.reshape(-1, 8, 8), x_test=flat.x_test.reshape(-1, 8, 8)
        )
    x = data.images[..., None] if images else data.data
    name = "digits (8×8 images)" if images else "digits"
    return _split(x, data.target, test_fraction, seed, standardize, name)


SEPARATOR = 10  # sort_digits' separator token; the digits are tokens 0..9


def _distinct_rows(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """``n`` distinct rows of ``length`` digits, uniformly drawn, in random order."""
    if 10**length <= 4 * n:  # few possible rows: enumerate them all
        codes = rng.permutation(10**length)[:n]
        return (codes[:, None] // 10 ** np.arange(length - 1, -1, -1)) % 10
    rows = np.empty((0, length), np.int64)
    while len(rows) < n:
        rows = np.concatenate([rows, rng.integers(0, 10, (2 * (n - len(rows)) + 8, length))])
        _, first = np.unique(rows, axis=0, return_index=True)
        rows = rows[np.sort(first)]  # the first of each, in the order drawn
    return rows[:n]


def sort_digits(
    n: int = 5000, *, length: int = 8, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """Sort a sequence of digits, as next-token prediction: a sequence data set.

    A sequence is ``[x_1 … x_L, SEP, s_1 … s_L]``, ``2L + 1`` tokens: ``L =
    length`` random digits (tokens 0..9), the separator ``SEP`` (token 10),
    then the same digits sorted ascending. The vocabulary is 11 tokens
    (``n_classes = 11``). Inputs are the sequence without its last token and
    labels the sequence without its first (position ``t`` predicts token
    ``t + 1``), both ``(n, 2L)`` int32, but only the ``L`` *answer* positions
    ``t = L … 2L − 1`` (the separator and the first ``L − 1`` sorted digits,
    each followed by the next sorted digit) have a label; the first ``L``
    positions, which would predict the random input digits, hold
    :data:`IGNORE_LABEL` (-1). Accuracy on this set is the share of answer
    tokens predicted right.

    The ``n`` sequences are distinct, and the split is by multiset: no test
    sequence is a permutation of a training one, so no sorted answer in the
    test split is seen in training. The test split takes whole multisets
    until it holds at least ``round(test_fraction · n)`` sequences.

    Args:
      n: the number of sequences, at most ``10**length``.
      length: digits per sequence (``L``, at least 1).
      test_fraction, seed: the split and the draw.

    Example:
      >>> import jbp
      >>> data = jbp.load_dataset("sort", n=10, length=3)
      >>> data.x_train.shape, data.y_train.shape, data.n_classes
      ((8, 6), (8, 6), 11)
      >>> int(data.y_train[0, 0]), bool((data.y_train[:, 3:] >= 0).all())
      (-1, True)
    """
    for name, value in (("n", n), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if length <= 18 and n > 10**length:  # 10**19 sequences and more: never short
        raise ValueError(
            f"`n`={n} sequences of `length`={length} cannot all be distinct: there are only "
            f"{10**length} digit sequences of that length; ask for fewer or longer ones"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in [0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    digits = _distinct_rows(rng, n, length)
    ordered = np.sort(digits, axis=1)
    _, multiset = np.unique(ordered, axis=0, return_inverse=True)
    multiset = multiset.reshape(-1)
    rank = rng.permutation(int(multiset.max()) + 1)[multiset]  # multisets in random order
    order = np.argsort(rank, kind="stable")
    n_test = round(test_fraction * n)
    if n_test:  # take the last multiset the count reaches whole
        n_test = int(np.searchsorted(rank[order], rank[order[n_test - 1]], side="right"))
    if n_test >= n:
        raise ValueError(
            f"`test_fraction`={test_fraction!r} puts all {n} sequences in the test split; "
            "leave at least one for training"
        )
    sep = np.full((n, 1), SEPARATOR)
    seq = np.concatenate([digits, sep, ordered], axis=1).astype(np.int32)
    x, y = seq[:, :-1], seq[:, 1:].copy()
    y[:, :length] = IGNORE_LABEL
    test, train = order[:n_test], rng.permutation(order[n_test:])
    name = f"sort(n={n}, length={length})"
    return Dataset(x[train], y[train], x[test], y[test], SEPARATOR + 1, name)


def _windows(data: bytes, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One document's bytes as next-byte windows of ``length``: tokens, labels (the
    next byte; -1 past the end) and the padding mask; the last window padded."""
    tokens = np.frombuffer(data, np.uint8).astype(np.int32)
    n = len(tokens) - 1  # positions with a next byte
    count = max(1, -(-n // length))
    x = np.zeros((count, length), np.int32)
    y = np.full((count, length), IGNORE_LABEL, np.int32)
    mask = np.zeros((count, length), bool)
    for k in range(count):
        piece = tokens[k * length : k * length + length + 1]
        m = len(piece) - 1
        x[k, :m], y[k, :m], mask[k, :m] = piece[:-1], piece[1:], True
    return x, y, mask


_TOP_LEVEL = re.compile(rb"\n(?=(?:def |class |async def |@))")


def _blocks(data: bytes) -> list[bytes]:
    """A source file's top-level blocks: split before each line that starts a
    top-level definition (``def``, ``class``, a decorator), each at least two bytes
    long (one next-byte target)."""
    return [b for b in _TOP_LEVEL.split(data) if len(b) >= 2]


def python_stdlib(
    *, length: int = 128, max_bytes: int = 1_000_000, test_fraction: float = 0.1, seed: int = 0
) -> Dataset:
    """Byte-level language modelling on Python's own standard library: a real corpus
    that every machine with Python has, no download.

    The top-level ``.py`` files of the running interpreter's standard library
    (``os.path.dirname(os.__file__)``), in a seeded order, are split *by file*
    into training and held-out documents (``test_fraction`` of the files), taking
    files until ``max_bytes`` are read. A document is one top-level block of a
    file (the file split before each line that starts a top-level ``def``,
    ``class`` or decorator: a function, a class with its methods, the module's
    header), so documents run from a few bytes to tens of kilobytes. Each is cut into windows of
    ``length`` bytes, next-byte prediction: tokens are bytes (vocabulary 256),
    labels the next byte. The last window of each document is shorter: padded
    with token 0, label -1 and a False in the mask, so the data set holds
    documents of different lengths padded into fixed shapes.

    Returns:
      A sequence :class:`Dataset` with ``mask_train``, ``mask_test``; its name
      says how many files and bytes it holds.
    """
    for name, value in (("length", length), ("max_bytes", max_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}")
    folder = os.path.dirname(os.__file__)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    chosen, total = [], 0
    for f in files:
        with open(os.path.join(folder, f), "rb") as handle:
            data = handle.read()
        if len(data) < 2:
            continue
        chosen.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    n_test = max(1, round(test_fraction * len(chosen)))
    if n_test >= len(chosen):
        raise ValueError(f"{len(chosen)} files are too few to split; raise `max_bytes`")
    parts = [[_windows(doc, length) for doc in _blocks(data)] for data in chosen]
    test = [w for file in parts[:n_test] for w in file]
    train = [w for file in parts[n_test:] for w in file]
    join = [np.concatenate([p[k] for p in split]) for split in (train, test) for k in range(3)]
    order = np.random.default_rng([seed, 1]).permutation(len(join[0]))
    x_tr, y_tr, m_tr = (a[order] for a in join[:3])
    x_te, y_te, m_te = join[3:]
    name = (
        f"stdlib(files={len(chosen) - n_test}+{n_test}, documents={len(train)}+{len(test)}, "
        f"length={length})"
    )
    return Dataset(x_tr, y_tr, x_te, y_te, 256, name, m_tr, m_te)


def majority(
    n: int = 4000,
    *,
    max_length: int = 16,
    vocab: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Variable-length sequences, classified by their most frequent token.

    Each sequence has a length uniform in ``[1, max_length]`` and tokens uniform
    in ``[0, vocab)``, drawn again until one token is strictly the most frequent;
    its label is that token. Sequences are right-padded with token 0 to
    ``max_length``: without the padding mask the pads would count as zeros and
    change the answer, so an encoder must respect the mask (attention over real
    keys, a masked mean). One label per sequence: ``y`` ``(n,)``.
    """
    for name, value, least in (("n", n, 1), ("max_length", max_length, 1), ("vocab", vocab, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
    rng = np.random.default_rng(seed)
    x = np.zeros((n, max_length), np.int32)
    mask = np.zeros((n, max_length), bool)
    y = np.zeros((n,), np.int32)
    for i in range(n):
        while True:
            t = int(rng.integers(1, max_length + 1))
            tokens = rng.integers(0, vocab, t)
            counts = np.bincount(tokens, minlength=vocab)
            if (counts == counts.max()).sum() == 1:
                break
        x[i, :t], mask[i, :t], y[i] = tokens, True, int(counts.argmax())
    n_test = round(test_fraction * n)
    test, train = np.arange(n_test), np.arange(n_test, n)
    name = f"majority(n={n}, max_length={max_length}, vocab={vocab})"
    return Dataset(x[train], y[train], x[test], y[test], vocab, name, mask[train], mask[test])


def _check_xy(x: np.ndarray, y: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise ValueError(
            f"{path}: features must be 2-D (examples, features), got shape {x.shape}; images "
            "may be (examples, height, width) or (examples, height, width, channels)"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{path}: labels must be 1-D with one per example ({x.shape[0]}), got shape {y.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: features contain NaN or Inf")
    if y.size and (not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0):
        raise ValueError(f"{path}: labels must be non-negative integers")
    if x.shape[0] < 2:
        raise ValueError(f"{path}: need at least 2 examples, got {x.shape[0]}")
    return x, y


def load_npz(
    path: str | os.PathLike,
    *,
    x_key: str = "x",
    y_key: str = "y",
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
    add_channel: bool | None = None,
) -> Dataset:
    """Load inputs ``x_key`` and integer labels ``y_key`` from an ``.npz`` file.

    ``x`` is ``(n, features)`` (flat data), ``(n, height, width)`` (grayscale
    images: a channel axis is added, giving ``(n, height, width, 1)``), or
    ``(n, ..., channels)`` of rank 4 or more (images, channels last, kept as
    they are). ``add_channel=False`` keeps a rank-3 ``x`` as it is (e.g.
    signals ``(n, length, channels)``); ``True`` adds a trailing channel axis
    to ``x`` of any rank. Flat data is standardised per feature, images per
    channel (see the module docstring).
    """
    if add_channel is not None and not isinstance(add_channel, bool):
        raise TypeError(f"`add_channel` must be True, False or None, got {add_channel!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:  # ours to close, also when np.load fails half way
        try:
            f = np.load(fh, allow_pickle=False)
        except Exception as err:  # a truncated zip, a pickle, plain text ...
            raise ValueError(
                f"{path}: not a readable .npz file ({type(err).__name__}: {err})"
            ) from None
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError(
                f"{path}: holds a single array, not an .npz archive with {x_key!r} and {y_key!r}"
            )
        missing = [k for k in (x_key, y_key) if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; the file has {sorted(f.files)}")
        try:
            x, y = np.asarray(f[x_key], np.float64), np.asarray(f[y_key], np.float64)
        except Exception as err:
            raise ValueError(
                f"{path}: could not read arrays ({type(err).__name__}: {err})"
            ) from None
    x, y = _check_xy(x, y, path)
    if add_channel or (add_channel is None and x.ndim == 3):
        x = x[..., None]
    return _split(x, y, test_fraction, seed, standardize, os.path.basename(path))


def load_csv(
    path: str | os.PathLike,
    *,
    label_column: int = -1,
    header: bool | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """Load a CSV of numeric features with an integer label column.

    Args:
      path: the file.
      label_column: which column holds the labels (default the last).
      header: whether the first row is a header (default: detected, a first
        row that does not parse as numbers is a header).
    """
    path = os.fspath(path)
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row and any(c.strip() for c in row)]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text CSV file") from None
    if header is None and rows:
        try:
            [float(c) for c in rows[0]]
            header = False
        except ValueError:
            header = True
    if header:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"{path}: row {i + 1 + bool(header)} has {len(row)} columns, expected {width}"
            )
    if width < 2:
        raise ValueError(f"{path}: need at least one feature column and a label column")
    if not -width <= label_column < width:
        raise ValueError(
            f"`label_column`={label_column} is out of range for {path}, which has {width} columns"
        )
    try:
        table = np.array([[float(c) for c in row] for row in rows])
    except ValueError as err:
        raise ValueError(f"{path}: non-numeric value ({err})") from None
    y = table[:, label_column]
    x = np.delete(table, label_column % width, axis=1)
    x, y = _check_xy(x, y, path)
    return _split(x, y.astype(np.int64), test_fraction, seed, standardize, os.path.basename(path))


ORDER_STREAM = 0x0BA7C4  # folded into the seed's key: the batch order's own stream


def order_key(seed: Any) -> Any:
    """The PRNG key of a run's batch order: ``fold_in(key(seed), ORDER_STREAM)``
    (a stream of its own, apart from the params' and the steps' keys)."""
    return jax.random.fold_in(jax.random.key(seed), ORDER_STREAM)


def permutation(key: Any, epoch: Any, n: int) -> Any:
    """The order of ``n`` examples in ``epoch``: ``jax.random.permutation`` of
    ``arange(n)`` (int32) under ``fold_in(key, epoch)``. Traceable (``epoch`` may be a
    traced int), so a jitted training loop draws it on the device; threefry and a
    stable sort make it the same on every backend."""
    return jax.random.permutation(jax.random.fold_in(key, epoch), jnp.arange(n, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _order(n: int, key: Any, epoch: Any) -> Any:
    return permutation(key, epoch, n)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` examples in ``epoch`` of a run seeded ``seed``
    (:func:`permutation` under :func:`order_key`): the order :func:`jbp.fit` draws
    on the device, read back to the host."""
    if n == 0:
        return np.zeros((0,), np.int64)
    return np.asarray(_order(n, order_key(seed), np.int32(epoch))).astype(np.int64)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    mask: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Seeded minibatches: the order for ``(seed, epoch)`` is always the same, and
    it is the order in which :func:`jbp.fit` (which draws it on the device) takes
    the training split's examples.

    Args:
      x, y: arrays with the same leading length.
      batch_size: examples per batch (the last may be smaller unless ``drop_last``).
      seed, epoch: the permutation (:func:`epoch_order`) is a function of both, so
        a resumed run sees the same batches as an uninterrupted one.
      mask: a padding mask with the same leading length: then each batch is
        ``(x, y, mask)``, else ``(x, y)``.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"`x` has {n} examples but `y` has {y.shape[0]}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield (x[idx], y[idx]) if mask is None else (x[idx], y[idx], mask[idx])


_BUILT_IN: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "majority": majority,
    "moons": moons,
    "sort": sort_digits,
    "spirals": spirals,
    "stdlib": python_stdlib,
    "xor": xor,
}
_LOADERS: dict[str, Callable[..., Dataset]] = {".npz": load_npz, ".csv": load_csv}


def dataset_names() -> tuple[str, ...]:
    """The names of the built-in data sets, sorted."""
    return tuple(sorted(_BUILT_IN))


def load_dataset(
    name: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.2, **options: Any
) -> Dataset:
    """A built-in data set by name, or a user's ``.npz`` / ``.csv`` file by path.

    Args:
      name: ``"digits"`` (scikit-learn's 8×8 digits, 64 features, or with
        ``images=True`` ``(8, 8, 1)`` images; 10 classes), ``"moons"`` (2
        features, 2 classes), ``"spirals"`` (2 features, 3 classes by
        default), ``"sort"`` (sorting digits as next-token prediction: int32
        tokens ``(n, 2·length)`` and labels per position, :data:`IGNORE_LABEL`
        where there is no target; 11 tokens; see :func:`sort_digits`),
        ``"xor"`` (the four points; train = test, so ``seed`` and
        ``test_fraction`` do not apply), ``"stdlib"`` (byte-level language
        modelling on the Python standard library's source, split by file,
        documents padded into windows: a padding mask; see
        :func:`python_stdlib`), ``"majority"`` (variable-length sequences
        classified by their most frequent token, padded: a padding mask; see
        :func:`majority`), or a path ending in ``.npz``
        (arrays ``x`` ``(n, features)`` or images ``(n, height, width)`` /
        ``(n, height, width, channels)``, and ``y`` ``(n,)``) or ``.csv``
        (numeric columns, labels in the last).
      seed: seeds the generated points and the train/test split.
      test_fraction: the share of examples held out for testing.
      **options: passed to the loader: ``n``, ``noise`` (moons, spirals),
        ``classes`` (spirals), ``length`` (sort, stdlib), ``max_bytes`` (stdlib),
        ``max_length``, ``vocab`` (majority), ``images``, ``rows`` (digits), ``standardize`` (digits,
        files), ``x_key``, ``y_key``, ``add_channel`` (.npz),
        ``label_column``, ``header`` (.csv).

    Returns:
      A :class:`Dataset`: float32 inputs, int32 labels, standardised with
      the training split's statistics (except xor): per feature for flat
      data, per channel for images. ``"sort"``: int32 tokens and labels
      per position.

    Example:
      >>> import jbp
      >>> data = jbp.load_dataset("moons", n=100, seed=1)
      >>> data.x_train.shape, data.x_test.shape, data.n_classes
      ((80, 2), (20, 2), 2)
      >>> jbp.load_dataset("digits", images=True).input_shape
      (8, 8, 1)
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"`name` must be a data set name or a file path, got {type(name).__name__}")
    text = os.fspath(name)
    if text in _BUILT_IN:
        loader = _BUILT_IN[text]
        label = f"load_dataset({text!r})"
    else:
        ext = os.path.splitext(text)[1].lower()
        if ext not in _LOADERS:
            if os.path.exists(text):
                raise ValueError(
                    f"{text}: unsupported file type {ext or '(none)'!r}; use a .npz or .csv file"
                )
            raise ValueError(
                f"unknown data set {text!r}; known: {', '.join(dataset_names())}, or a path to "
                "a .npz or .csv file"
            )
        loader = _LOADERS[ext]
        label = f"load_dataset(<{ext} file>)"
        options = {"path": text, **options}
    accepted = set(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        allowed = ", ".join(sorted(accepted - {"path", "seed", "test_fraction"})) or "none"
        raise TypeError(f"{label} got unknown options {unknown}; it accepts: {allowed}")
    if "seed" in accepted:
        options["seed"] = seed
    if "test_fraction" in accepted:
        options["test_fraction"] = test_fraction
    return loader(**options)
