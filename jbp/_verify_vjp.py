"""Check any hand-written VJP: ``check_vjp``.

The rules JAX users write by hand (``jax.custom_vjp`` and ``jax.custom_jvp``
functions, or an explicit ``(fwd, bwd)`` pair: memory-efficient attention, fused
kernels, stable losses, implicit layers, straight-through estimators) are
compared, for a random output cotangent ``c``, input leaf by input leaf, with
two oracles:

- **autodiff**: ``jax.vjp`` of the *reference*, the same function without its
  hand-written rule (``f.fun`` of a custom_vjp/custom_jvp function, the primal
  output of ``fwd`` for a pair, or a function you give: the stated surrogate of
  a straight-through estimator), in the primals' dtype;
- **finite differences**: float64 central differences of ``φ(x) = ⟨c, f(x)⟩``
  along coordinates of each input leaf (all of them, or a random subset of
  ``fd_coordinates``), compared with the hand-written VJP run in float64; and
  the Taylor-remainder test of ``φ`` along one random direction (order 2 for a
  right rule, 1 for a wrong one).

Nondifferentiable points: where the one-sided differences of a coordinate
disagree (a kink such as ``relu`` at exactly 0), any value between them is
accepted (a subgradient) and the row says how many coordinates sat at a kink;
the Taylor test is then skipped. Autodiff of the reference may pick the other
side at such a point, so give primals off the kinks (the default random draws
are) when autodiff should decide.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._checks import check_key
from ._report import DEFAULT_RTOL, FD_RTOL, PRECISION, LeafRow, Report, compare, current_precision
from ._verify import _to64, taylor_check

Array = jax.Array

FD_STEP = 1e-5  # central-difference step, times max(1, |x_j|), in float64
KINK = 1e-3  # one-sided differences further apart than this (relative to scale): a kink
_ORACLES = ("autodiff", "finite differences")


def _functions(f: Any, reference: Any) -> tuple[Any, Any, str, tuple[int, ...], Any]:
    """``(tested, reference or None, kind, nondiff_argnums, named)`` for any accepted
    ``f``; ``named``: the function whose parameters name the arguments."""
    if reference is not None and not callable(reference):
        raise TypeError(f"`reference` must be a function or None, got {type(reference).__name__}")
    if isinstance(f, tuple):
        if len(f) != 2 or not all(callable(g) for g in f):
            raise TypeError(
                "`f` as a tuple must be a (fwd, bwd) pair of functions: fwd(*primals) -> "
                f"(out, residuals), bwd(residuals, cotangent) -> input cotangents; got {f!r}"
            )
        fwd, bwd = f

        def primal(*args: Any) -> Any:
            return fwd(*args)[0]

        tested = jax.custom_vjp(primal)
        tested.defvjp(fwd, bwd)
        return tested, reference or primal, "a (fwd, bwd) pair", (), fwd
    if isinstance(f, jax.custom_vjp):
        return f, reference or f.fun, "jax.custom_vjp", tuple(f.nondiff_argnums), f.fun
    if isinstance(f, jax.custom_jvp):
        return f, reference or f.fun, "jax.custom_jvp, transposed", tuple(f.nondiff_argnums), f.fun
    if callable(f):
        return f, reference, "the function's own rules", (), f
    raise TypeError(
        "`f` must be a jax.custom_vjp or jax.custom_jvp function, a (fwd, bwd) pair or "
        f"a function whose rules are its own, got {type(f).__name__}"
    )


def _primal(value: Any, name: str, rng: np.random.Generator) -> Any:
    """One primal: arrays as given, ``jax.ShapeDtypeStruct`` leaves drawn N(0, 1)."""

    def leaf(path: Any, v: Any) -> Any:
        where = name + jtu.keystr(path)
        if isinstance(v, jax.ShapeDtypeStruct):
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(
                    f"`{where}` is a ShapeDtypeStruct of {jnp.dtype(v.dtype).name}: only "
                    "floating leaves are drawn at random; give integer inputs as arrays"
                )
            return jnp.asarray(rng.standard_normal(v.shape), v.dtype)
        try:
            a = jnp.asarray(v)
        except TypeError:
            raise TypeError(f"`{where}` must be an array, got {type(v).__name__}") from None
        if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
                or a.dtype == jnp.bool_):  # fmt: skip
            raise TypeError(f"`{where}` must be a floating or integer array, got {a.dtype.name}")
        if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
            raise ValueError(
                f"`{where}` holds NaN or Inf ({int(jnp.sum(~jnp.isfinite(a)))} of {a.size} "
                "values): a bad input, not a point to check a derivative at"
            )
        return a

    return jtu.tree_map_with_path(
        leaf, value, is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct)
    )


def _arg_name(fn: Any, i: int) -> str:
    """``primals[i]``, named by the function's own parameter where it has one:
    ``primals[1] (k)``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return f"primals[{i}]"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if i < len(params) and all(p.kind in positional for p in params[: i + 1]):
        return f"primals[{i}] ({params[i].name})"
    return f"primals[{i}]"


def _static(value: Any) -> bool:
    """A Python int, bool, str or None argument: passed as given and held fixed (a
    block size, a flag), never made an array."""
    return value is None or isinstance(value, (int, bool, str))


def _floating(tree: Any) -> bool:
    leaves = jtu.tree_leaves(tree)
    return bool(leaves) and all(
        hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) for a in leaves
    )


def _cotangent(out: Any, given: Any, rng: np.random.Generator) -> Any:
    """A cotangent for each output leaf: given, or N(0, 1) (float0 for integers)."""
    if given is not None:
        if jtu.tree_structure(given) != jtu.tree_structure(out):  # type: ignore[operator]
            raise ValueError(
                f"`cotangent` must have the output's tree {jtu.tree_structure(out)}, got "
                f"{jtu.tree_structure(given)}"
            )
        for (path, g), o in zip(
            jtu.tree_leaves_with_path(given), jtu.tree_leaves(out), strict=True
        ):
            if tuple(jnp.shape(g)) != tuple(o.shape):
                raise ValueError(
                    f"`cotangent{jtu.keystr(path)}` must have the output's shape {tuple(o.shape)}, "
                    f"got {tuple(jnp.shape(g))}"
                )
        return jtu.tree_map(lambda g, o: jnp.asarray(g, o.dtype), given, out)

    def draw(o: Any) -> Any:
        if jnp.issubdtype(o.dtype, jnp.floating):
            return jnp.asarray(rng.standard_normal(o.shape), o.dtype)
        return np.zeros(o.shape, jax.dtypes.float0)

    return jtu.tree_map(draw, out)


def _vjp_fn(
    fn: Any, primals: tuple[Any, ...], diff: tuple[int, ...], forward_only: bool = False
) -> Callable[..., Any]:
    """``(diff primals, cotangent) -> cotangents of the diff primals``, the other
    arguments closed over (never traced); ``forward_only``: ``diff primals -> f(...)``."""

    def call(*ds: Any) -> Any:
        args = list(primals)
        for i, v in zip(diff, ds, strict=True):
            args[i] = v
        return fn(*args)

    def run(d: tuple[Any, ...], ct: Any = None) -> Any:
        if forward_only:
            return call(*d)
        _, vjp = jax.vjp(call, *d)  # reference: the rule under test, or autodiff's
        return vjp(ct)

    return run


def _phi(fn: Any, primals: tuple[Any, ...], diff: tuple[int, ...], ct: Any) -> Callable[..., Any]:
    """``φ(diff primals) = Σ ⟨c, f(...)⟩`` over the floating output leaves, in float64."""

    def phi(*ds: Any) -> Array:
        args = list(primals)
        for i, v in zip(diff, ds, strict=True):
            args[i] = v
        out = fn(*args)
        terms = [
            jnp.vdot(c.astype(jnp.float64), o.astype(jnp.float64))
            for c, o in zip(jtu.tree_leaves(ct), jtu.tree_leaves(out), strict=True)
            if jnp.issubdtype(o.dtype, jnp.floating)
        ]
        return sum(terms[1:], terms[0])

    return phi


def check_vjp(
    f: Any,
    *primals: Any,
    reference: Callable[..., Any] | None = None,
    cotangent: Any = None,
    key: Array | None = None,
    rtol: float | None = None,
    finite_differences: bool = True,
    fd_coordinates: int = 128,
) -> Report:
    """Check a hand-written VJP against autodiff and float64 finite differences.

    Args:
      f: the function whose VJP was written by hand: a ``jax.custom_vjp``
        function, a ``jax.custom_jvp`` one (its VJP is its JVP rule transposed),
        a ``(fwd, bwd)`` pair as given to ``defvjp`` (``fwd(*primals) -> (out,
        residuals)``, ``bwd(residuals, cotangent) -> one cotangent per
        primal``), or any function (its rules are whatever custom rules it
        calls; give ``reference`` for the autodiff oracle).
      *primals: the point, one argument each: arrays or pytrees of arrays, or
        ``jax.ShapeDtypeStruct`` leaves, drawn N(0, 1) from ``key``. Integer
        (and bool) arguments, and a custom_vjp's ``nondiff_argnums``, are held
        fixed: they have no cotangent, and the report's notes say so.
      reference: the function the rule claims to differentiate (default: ``f``
        without its rule, ``f.fun``; for a pair, ``fwd``'s output). For a
        straight-through estimator, the stated surrogate.
      cotangent: the output cotangent (default N(0, 1) from ``key``).
      key: PRNG key for the random primals and cotangent (default key 0).
      rtol: tolerance of the autodiff rows (default by dtype: 1e-9 float64,
        1e-4 float32, 1e-2 for 16-bit floats). Finite-difference rows use
        ``1e-6`` when the rule runs in float64 (the primals upcast), else the
        dtype's tolerance.
      finite_differences: also run the float64 finite differences and the
        Taylor-remainder test (default True; 64-bit types are enabled for them).
      fd_coordinates: coordinates differenced per input leaf (all of a smaller
        leaf; a random subset of a larger one, said in the row's note).

    Returns:
      A :class:`jbp.Report`, one row per input leaf and oracle (the ``oracle``
      column): max abs error, error relative to the reference leaf's scale,
      bitwise, ok. A rule that raises is a failed row with the exception's
      message; NaN or Inf on either side fails. A leaf no oracle could check
      (autodiff unavailable or not finite, finite differences off) fails too.
      Everything runs under ``jax.default_matmul_precision("highest")``, whatever
      the global default (the report records it).

    Raises:
      TypeError, ValueError: bad arguments (named), before anything is traced;
        NaN or Inf in a primal is a bad input.

    Example:
      >>> import jax, jax.numpy as jnp, jbp
      >>> @jax.custom_vjp
      ... def softplus(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> softplus.defvjp(lambda x: (softplus(x), x),
      ...                 lambda x, c: (c * jax.nn.sigmoid(x),))
      >>> jbp.check_vjp(softplus, jax.ShapeDtypeStruct((3,), "float32")).ok
      True
    """
    tested, ref, kind, nondiff, named = _functions(f, reference)
    if not primals:
        raise ValueError("`primals` is empty: give the point to check at, e.g. check_vjp(f, x)")
    key = jax.random.key(0) if key is None else key
    check_key(key)
    if (
        isinstance(fd_coordinates, bool)
        or not isinstance(fd_coordinates, int)
        or fd_coordinates < 1
    ):
        raise ValueError(f"`fd_coordinates` must be a positive int, got {fd_coordinates!r}")
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    args = tuple(
        p if i in nondiff or _static(p) else _primal(p, f"primals[{i}]", rng)
        for i, p in enumerate(primals)
    )
    notes = []
    diff = []
    for i, a in enumerate(args):
        if i in nondiff:
            notes.append(f"primals[{i}]: held fixed (nondiff_argnums of the custom_vjp)")
        elif _static(a):
            notes.append(f"primals[{i}]: held fixed (a Python {type(a).__name__}: static)")
        elif not _floating(a):
            notes.append(f"primals[{i}]: held fixed (not floating: no cotangent)")
        else:
            diff.append(i)
    if not diff:
        raise ValueError("no floating argument to differentiate: every primal is integer or fixed")
    diff_t = tuple(diff)
    d_args = tuple(args[i] for i in diff_t)
    try:  # traced at the precision of the check, as everything below
        with jax.default_matmul_precision(PRECISION):
            out = jax.eval_shape(
                lambda d: _vjp_fn(tested, args, diff_t, forward_only=True)(d), d_args
            )
    except Exception as e:
        raise ValueError(f"`f` cannot be called on the primals: {type(e).__name__}: {e}") from e
    if not any(jnp.issubdtype(o.dtype, jnp.floating) for o in jtu.tree_leaves(out)):
        raise ValueError("`f` returns no floating output: there is nothing to differentiate")
    ct = _cotangent(out, cotangent, rng)
    dtypes = {jnp.dtype(a.dtype) for a in jtu.tree_leaves(d_args)}
    dtype = min(dtypes, key=lambda d: d.itemsize).name  # the least precise input
    tol = float(rtol) if rtol is not None else max(DEFAULT_RTOL.get(d.name, 1e-4) for d in dtypes)
    names = [_arg_name(named, i) for i in diff_t]

    with jax.default_matmul_precision(PRECISION):
        precision = current_precision()
        try:
            got = jax.jit(_vjp_fn(tested, args, diff_t))(d_args, ct)
        except Exception as e:
            row = LeafRow.failure("vjp", f"the hand-written VJP raised {type(e).__name__}: {e}")
            return _report((row,), kind, ref is not None, tol, dtype, precision, None, notes)
        by_leaf: dict[str, list[LeafRow]] = {path: [] for path in _leaf_paths(got, names)}
        taylor, kinks = None, dict[str, Any]()
        if finite_differences:
            fd_rows, taylor, kinks, fd_notes = _finite_differences(
                tested, ref if ref is not None else tested, args, diff_t, ct, got, names,
                rtol, fd_coordinates, rng,
            )  # fmt: skip
            notes += fd_notes
            for row in fd_rows:
                by_leaf[row.path].append(row)
        if ref is None:
            notes.append(
                "autodiff: no reference given (f's rules are its own): finite differences only"
            )
        else:
            try:
                want = jax.jit(_vjp_fn(ref, args, diff_t))(d_args, ct)
            except Exception as e:
                notes.append(f"autodiff of the reference is unavailable: {type(e).__name__}: {e}")
            else:
                for row in _leaf_rows(got, want, names, rtol, kinks):
                    if "non-finite values in reference" in row.note:
                        notes.append(
                            f"{row.path}: autodiff of the reference is not finite here: not used"
                        )
                        continue
                    by_leaf[row.path].insert(0, row)
    rows_out: list[LeafRow] = []
    for path, rows in by_leaf.items():
        rows_out += rows or [LeafRow.failure(path, "no oracle could check this leaf")]
    return _report(tuple(rows_out), kind, ref is not None, tol, dtype, precision, taylor, notes)


def _report(
    rows: tuple[LeafRow, ...],
    kind: str,
    autodiff: bool,
    tol: float,
    dtype: str,
    precision: str,
    taylor: Any,
    notes: list[str],
) -> Report:
    oracles = "autodiff of the reference (jax.vjp)" if autodiff else ""
    oracles += ("; " if oracles else "") + "float64 central differences"
    return Report(
        rows,
        (f"hand-written VJP ({kind})", oracles),
        tol,
        dtype,
        precision,
        jax.default_backend(),
        taylor=taylor,
        notes=tuple(notes),
        title="VJP check",
    )


def _leaf_paths(cts: Any, names: list[str]) -> list[str]:
    return [
        name + jtu.keystr(path)
        for name, ct in zip(names, cts, strict=True)
        for path, _ in jtu.tree_leaves_with_path(ct)
    ]


def _leaf_rows(
    got: Any, want: Any, names: list[str], rtol: float | None, kinks: dict[str, Any]
) -> list[LeafRow]:
    """Autodiff rows; at the coordinates finite differences found at a kink
    (``kinks[path] = (indices, low, high)``) any value of the hand-written VJP
    between the one-sided derivatives is taken as right, whatever side autodiff chose."""
    rows: list[LeafRow] = []
    for name, g, w in zip(names, got, want, strict=True):
        g, w = _drop_float0(g), _drop_float0(w)
        if jtu.tree_structure(g) != jtu.tree_structure(w):  # type: ignore[operator]
            note = f"tree {jtu.tree_structure(g)} vs reference {jtu.tree_structure(w)}"
            rows.append(LeafRow.failure(name, note, oracle=_ORACLES[0]))
            continue
        for path, a, b in zip(
            [name + jtu.keystr(p) for p, _ in jtu.tree_leaves_with_path(g)],
            jtu.tree_leaves(g),
            jtu.tree_leaves(w),
            strict=True,
        ):
            note = ""
            if path in kinks and a.shape == b.shape:
                idx, low, high = kinks[path]
                a_flat = np.asarray(a, np.float64).ravel()[idx]
                inside = (a_flat >= low - 1e-6 * np.abs(low)) & (
                    a_flat <= high + 1e-6 * np.abs(high)
                )
                b = np.array(b).ravel()
                b[idx[inside]] = np.asarray(a).ravel()[idx[inside]]
                b = b.reshape(a.shape)
                note = f"{int(inside.sum())} at a kink: taken between the one-sided derivatives"
            (row,) = compare(a, b, rtol=rtol, names=("hand-written", "reference")).rows
            rows.append(dataclasses.replace(row, path=path, layer=None, oracle=_ORACLES[0],
                                            note="; ".join(n for n in (row.note, note) if n)))  # fmt: skip
    return rows


def _drop_float0(tree: Any) -> Any:
    """Integer leaves' float0 cotangents as None (no row: nothing to compare)."""
    return jtu.tree_map(lambda a: None if a.dtype == jax.dtypes.float0 else a, tree)


def _finite_differences(
    tested: Any,
    ref: Any,
    args: tuple[Any, ...],
    diff: tuple[int, ...],
    ct: Any,
    got: Any,
    names: list[str],
    rtol: float | None,
    coordinates: int,
    rng: np.random.Generator,
) -> tuple[list[LeafRow], Any, dict[str, Any], list[str]]:
    """Float64 central differences of ``φ = ⟨c, ref(x)⟩``, coordinate by coordinate,
    against the hand-written VJP run in float64; and the Taylor test of ``φ``."""
    notes: list[str] = []
    with jax.enable_x64(True):
        args64, ct64 = _to64(args), _to64(ct)
        d64 = tuple(args64[i] for i in diff)
        fd_tol: float | None = FD_RTOL
        try:
            g64 = jax.jit(_vjp_fn(tested, args64, diff))(d64, ct64)
            leaves64 = [a for a in jtu.tree_leaves(_drop_float0(g64))]
            if not all(a.dtype == jnp.float64 for a in leaves64):
                raise TypeError("it does not compute in float64")
        except Exception as e:
            notes.append(
                f"finite differences: the hand-written VJP in float64 failed ({type(e).__name__}: "
                f"{e}); its {jtu.tree_leaves(got)[0].dtype} result compared instead"
            )
            g64, fd_tol = _to64(got), None
        dtypes = [a.dtype.name for a in jtu.tree_leaves(_drop_float0(got))]
        if fd_tol is not None:
            notes.append(
                f"finite differences: tolerance {fd_tol:.0e} (the hand-written VJP run in float64)"
            )
        phi = _phi(ref, args64, diff, ct64)
        flat, treedef = jtu.tree_flatten(d64)
        g_flat = jtu.tree_leaves(_drop_float0(g64))

        def phi_flat(leaves: list[Array]) -> Array:
            return phi(*jtu.tree_unflatten(treedef, leaves))

        phi_jit = jax.jit(phi_flat)
        c0 = float(phi_jit(flat))
        rows: list[LeafRow] = []
        kinks: dict[str, Any] = {}
        paths = _leaf_paths(d64, names)
        floating = [k for k, a in enumerate(flat) if jnp.issubdtype(a.dtype, jnp.floating)]
        for k, g, dt in zip(floating, g_flat, dtypes, strict=True):
            x = np.asarray(flat[k]).ravel()
            n = x.size
            idx = np.arange(n) if n <= coordinates else np.sort(rng.choice(n, coordinates, False))
            h = FD_STEP * np.maximum(1.0, np.abs(x[idx]))
            steps = np.zeros((2 * idx.size, n))
            steps[np.arange(idx.size), idx] = h
            steps[idx.size + np.arange(idx.size), idx] = -h

            def at(step: Array, k: int = k) -> Array:
                leaves = list(flat)
                leaves[k] = flat[k] + step.reshape(flat[k].shape)
                return phi_flat(leaves)

            values = np.asarray(jax.jit(jax.vmap(at))(jnp.asarray(steps)))
            plus, minus = values[: idx.size], values[idx.size :]
            central = (plus - minus) / (2 * h)
            right, left = (plus - c0) / h, (c0 - minus) / h
            scale = max(float(np.max(np.abs(central))) if central.size else 0.0, 1e-300)
            kink = np.abs(right - left) > KINK * scale + 1e3 * np.finfo(np.float64).eps * (
                np.abs(c0) / h
            )
            tested_k = np.asarray(g, np.float64).ravel()[idx]
            lo, hi = np.minimum(left, right), np.maximum(left, right)
            oracle = np.where(kink, np.clip(tested_k, lo, hi), central)
            roundoff = float(
                1e3
                * np.finfo(np.float64).eps
                * max(abs(c0), float(np.max(np.abs(values))))
                / h.min()
            )
            leaf_tol = fd_tol if fd_tol is not None else rtol or DEFAULT_RTOL.get(dt, 1e-4)
            (row,) = compare(tested_k, oracle, rtol=leaf_tol, atol=roundoff).rows
            note = [f"{idx.size} of {n} coordinates"] if idx.size < n else []
            if kink.any():
                note.append(f"{int(kink.sum())} at a kink: any value between the one-sided ones")
                kinks[paths[k]] = (idx[kink], lo[kink], hi[kink])
            note = ([row.note] if row.note else []) + note
            rows.append(
                dataclasses.replace(
                    row,
                    path=paths[k],
                    shape=tuple(flat[k].shape),
                    note="; ".join(note),
                    oracle=_ORACLES[1],
                )
            )
        taylor = None
        if kinks:
            notes.append("Taylor test: skipped (the point sits at a nondifferentiable kink)")
        else:
            v = [rng.standard_normal(flat[k].shape) for k in floating]
            norm = math.sqrt(sum(float(np.sum(a * a)) for a in v))
            v = [a / norm for a in v]
            gv = sum(
                float(np.sum(np.asarray(g, np.float64) * a)) for g, a in zip(g_flat, v, strict=True)
            )

            def value_at(t: float) -> float:
                leaves = list(flat)
                for k, a in zip(floating, v, strict=True):
                    leaves[k] = flat[k] + t * a
                return float(phi_jit(leaves))

            taylor = taylor_check(value_at, c0, gv)
    return rows, taylor, kinks, notes
