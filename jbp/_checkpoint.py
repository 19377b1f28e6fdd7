"""Checkpoints of a training state: atomic, self-describing, pickle-free.

A checkpoint is one ``.npz`` file: every leaf of the state as an array
(``leaf_0``, ``leaf_1``, ... in tree order; PRNG keys as their key data) and a
JSON metadata string ``__meta__`` holding the format and version, the
network's description, the state's tree structure, each leaf's path, shape and
dtype, a SHA-256 of the leaf bytes and any extra metadata (JSON values).

Writing is atomic: the file is written to a temporary file in the same folder,
flushed and ``fsync``-ed, then moved over the old one with ``os.replace``, so a
crash mid-write leaves the previous checkpoint as it was. Loading checks, in
this order, that the file is a readable jbp checkpoint of a known version whose
bytes match their checksum (else "corrupt"), and that it was written for the
same network and state structure (else "does not match"), and raises
:class:`CheckpointError` with what differs.

:class:`RunFolder` is a training run's folder: ``checkpoint.npz`` and
``metrics.jsonl``, plus the run's printed lines, all written by process 0 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import zipfile
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._backprop import check_net

FORMAT = "jbp-checkpoint"
VERSION = 1
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match the run."""


def network_description(net: Any) -> str:
    """The description stored in (and checked against) a checkpoint: ``repr(net)``."""
    return repr(check_net(net))


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _write(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """Write the archive to an open file (a seam for tests that simulate a crash)."""
    np.savez(f, **arrays)  # type: ignore[arg-type]


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file in the same
    folder, which is flushed, ``fsync``-ed and moved over ``path``; on any
    error the temporary file is removed and ``path`` is left untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike, state: Any, net: Any, *, extra: dict[str, Any] | None = None
) -> None:
    """Write ``state`` (any pytree, e.g. a :class:`TrainState`) atomically to ``path``.

    Args:
      path: the ``.npz`` file to write (its folder is created).
      state: the pytree to save; PRNG-key leaves are stored as key data.
      net: the network the state belongs to; its description is stored and
        checked on load.
      extra: JSON-serialisable metadata returned by :func:`load_checkpoint`.
    """
    write_checkpoint(path, state, network_description(net), extra)


def write_checkpoint(
    path: str | os.PathLike, state: Any, network: str, extra: dict[str, Any] | None
) -> None:
    """:func:`save_checkpoint` with the network's description already made."""
    leaves_with_path, treedef = jtu.tree_flatten_with_path(state)
    arrays, leaves_meta = [], []
    for p, leaf in leaves_with_path:
        key_impl = None
        if _is_key(leaf):
            key_impl = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        a = np.asarray(jax.device_get(leaf))
        arrays.append(a)
        leaves_meta.append(
            {"path": jtu.keystr(p), "shape": list(a.shape), "dtype": a.dtype.str, "key": key_impl}
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "network": network,
        "treedef": str(treedef),
        "leaves": leaves_meta,
        "sha256": _digest(arrays),
        "extra": extra or {},
    }
    payload = {f"leaf_{i}": a for i, a in enumerate(arrays)}
    payload[_META] = np.array(json.dumps(meta, allow_nan=False))
    atomic_write(path, lambda f: _write(f, payload))


def _read(path: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path}: no such file")

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} is corrupt or not a jbp checkpoint: {why}")

    try:
        with open(path, "rb") as fh:  # ours to close, also when np.load fails half way
            f = np.load(fh, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise corrupt("it holds a single array, not an .npz archive")
            if _META not in f.files:
                raise corrupt(f"no {_META!r} entry (the file has {sorted(f.files)[:5]})")
            meta = json.loads(str(f[_META]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else meta
                raise corrupt(f"its format is {found!r}, not {FORMAT!r}")
            if meta.get("version") != VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format version {meta.get('version')!r}; this jbp "
                    f"reads version {VERSION}"
                )
            absent = [k for k in ("network", "treedef", "leaves", "sha256") if k not in meta]
            if absent:
                raise corrupt(f"its metadata lacks {absent}")
            n = len(meta["leaves"])
            missing = [f"leaf_{i}" for i in range(n) if f"leaf_{i}" not in f.files]
            if missing:
                raise corrupt(f"missing arrays {missing}")
            arrays = [f[f"leaf_{i}"] for i in range(n)]
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise corrupt(f"{type(err).__name__}: {err}") from None
    if _digest(arrays) != meta.get("sha256"):
        raise corrupt("its arrays do not match their checksum")
    return meta, arrays


def load_checkpoint(path: str | os.PathLike, like: Any, net: Any) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` into the shape of ``like``.

    Args:
      path: the ``.npz`` file.
      like: a pytree with the structure, shapes and dtypes expected (e.g. a
        fresh ``init_state``); PRNG-key leaves come back as keys of its kind.
      net: the network of this run; it must equal the checkpoint's.

    Returns:
      ``(state, extra)``: the restored pytree and the extra metadata.

    Raises:
      CheckpointError: a missing, corrupt or unreadable file, an unknown
        format version, or a checkpoint of another network or state structure.
    """
    return read_checkpoint(path, like, network_description(net))


def read_checkpoint(path: str | os.PathLike, like: Any, network: str) -> tuple[Any, dict[str, Any]]:
    """:func:`load_checkpoint` with the network's description already made."""
    path = os.fspath(path)
    meta, arrays = _read(path)
    want_net = network
    if meta["network"] != want_net:
        raise CheckpointError(
            f"checkpoint {path} does not match the network: it was written for "
            f"{meta['network']} but this run's network is {want_net}"
        )
    like_leaves, treedef = jtu.tree_flatten_with_path(like)
    if meta["treedef"] != str(treedef) or len(meta["leaves"]) != len(like_leaves):
        raise CheckpointError(
            f"checkpoint {path} does not match the training state: it holds "
            f"{meta['treedef']} but this run has {treedef} (a different optimiser?)"
        )
    leaves = []
    for (p, want), got, a in zip(like_leaves, meta["leaves"], arrays, strict=True):
        if _is_key(want):
            data = jax.random.key_data(want)
            if got["key"] != str(jax.random.key_impl(want)) or a.shape != data.shape:
                raise CheckpointError(
                    f"checkpoint {path}: `{jtu.keystr(p)}` is a {got['key']} key of shape "
                    f"{a.shape} but this run uses {jax.random.key_impl(want)} keys"
                )
            leaves.append(jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(want)))
            continue
        want_shape, want_dtype = tuple(np.shape(want)), np.dtype(want.dtype)
        if a.shape != want_shape or a.dtype != want_dtype:
            raise CheckpointError(
                f"checkpoint {path} does not match the training state: `{jtu.keystr(p)}` is "
                f"{a.dtype.name}{list(a.shape)} in the checkpoint but {want_dtype.name}"
                f"{list(want_shape)} in this run"
            )
        leaves.append(jnp.asarray(a))
    return jtu.tree_unflatten(treedef, leaves), meta["extra"]


def read_params(path: str | os.PathLike, net: Any) -> tuple[Any, dict[str, Any]]:
    """Params kept by ``fit(keep_every=...)`` (``params/step_*.npz``) for ``net``, in
    the dtype they were saved in: ``(params, extra)``."""
    path = os.fspath(path)
    meta, _ = _read(path)
    floats = [np.dtype(leaf["dtype"]) for leaf in meta["leaves"]]
    dtype = next((d for d in floats if np.issubdtype(d, np.floating)), np.dtype(np.float32))
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), dtype))
    like = jtu.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return read_checkpoint(path, like, network_description(net))


CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
PARAMS = "params"  # fit(keep_every=k): the params every k steps, params/step_00000100.npz


class RunFolder:
    """A run's output in one place: printing, ``metrics.jsonl`` and
    ``checkpoint.npz``. Only process 0 (``jax.process_index() == 0``) prints
    or writes, so the same loop runs unchanged on every host.

    Args:
      run_dir: the folder, or None to write nothing.
      verbose: print progress lines.
      net: the run's network (checked by the caller); its description is
        made once and stored in, and checked against, every checkpoint.
    """

    def __init__(self, run_dir: str | os.PathLike | None, verbose: bool, net: Any) -> None:
        self.network = network_description(net)
        self.dir = None if run_dir is None else os.fspath(run_dir)
        self.main = jax.process_index() == 0
        self.verbose = verbose and self.main
        self.saved_step: int | None = None  # step of the checkpoint on disk

    def path(self, name: str) -> str:
        if self.dir is None:
            raise ValueError("this run has no run folder")
        return os.path.join(self.dir, name)

    @property
    def has_checkpoint(self) -> bool:
        return self.dir is not None and os.path.exists(self.path(CHECKPOINT))

    def say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def start(self) -> None:
        """A fresh run: create the folder and an empty ``metrics.jsonl``."""
        if self.dir is not None and self.main:
            os.makedirs(self.dir, exist_ok=True)
            self._write_metrics([])

    def write_config(self, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into the run folder's ``config.json`` (kept by ``jbp train``)."""
        if self.dir is None or not self.main:
            return
        path, config = self.path(CONFIG), {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        config.update(fields)
        text = json.dumps(config, indent=2, allow_nan=False) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))

    def history(self, upto_step: int) -> list[dict[str, Any]]:
        """The records in ``metrics.jsonl`` up to ``upto_step``, for a resumed run.

        Records past it (written after the checkpoint being resumed, before a
        crash) and a torn last line are dropped from the file too, so the
        resumed run writes them again once.
        """
        if self.dir is None or not os.path.exists(self.path(METRICS)):
            return []
        with open(self.path(METRICS), encoding="utf-8") as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= upto_step:
                kept.append(record)
        if self.main and len(kept) != len(lines):
            self._write_metrics(kept)
        return kept

    def _write_metrics(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        atomic_write(self.path(METRICS), lambda f: f.write(text.encode()))

    def record(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (NaN and Inf become null)."""
        if self.dir is not None and self.main:
            clean = {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in record.items()
            }
            with open(self.path(METRICS), "a", encoding="utf-8") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def save(self, state: Any, extra: dict[str, Any]) -> None:
        """Checkpoint ``state`` (a :class:`TrainState`, or a tuple whose first entry is
        one and whose others travel with it, such as in-run data values) atomically."""
        if self.dir is not None and self.main:
            write_checkpoint(self.path(CHECKPOINT), state, self.network, extra)
            train_state = state[0] if type(state) is tuple else state
            self.saved_step = int(jax.device_get(train_state.step))

    def write_array(self, name: str, array: np.ndarray) -> None:
        """Write ``array`` to ``name`` (a ``.npy`` file) in the folder, atomically."""
        if self.dir is not None and self.main:
            atomic_write(self.path(name), lambda f: np.save(f, array, allow_pickle=False))

    def keep_params(self, params: Any, step: int) -> None:
        """Keep the params after ``step`` steps as ``params/step_{step:08d}.npz``."""
        if self.dir is not None and self.main:
            path = os.path.join(self.path(PARAMS), f"step_{step:08d}.npz")
            write_checkpoint(path, params, self.network, {"step": step})

    def load(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """Read the run's checkpoint (every process reads it)."""
        if not self.has_checkpoint:
            raise CheckpointError(f"{self.dir} holds no {CHECKPOINT} to resume")
        state, extra = read_checkpoint(self.path(CHECKPOINT), like, self.network)
        train_state = state[0] if type(state) is tuple else state
        self.saved_step = int(jax.device_get(train_state.step))
        return state, extra
