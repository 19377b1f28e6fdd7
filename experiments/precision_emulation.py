"""What a GPU's TF32 or a TPU's one-bfloat16-pass matmuls do to a gradient check, on a CPU.

A CPU computes float32 matmuls in float32 whatever ``jax_default_matmul_precision``
says, so this emulates the reduced precision: every ``dot_general`` and
``conv_general_dilated`` of float32 operands, in both jbp's δ rules and
``jax.grad``'s transposes, gets its operands rounded to TF32's 10 or bfloat16's 7
mantissa bits (``lax.reduce_precision``, round to nearest), products accumulated
in float32. For random problems of each family (``jbp.random_problem``, float32)
it prints the worst relative error (as :func:`jbp.compare` measures it) of jbp
against ``jax.grad`` at the emulated precision, and of each against the float64
truth (``jax.grad`` of the upcast problem at "highest"). Loops (``scan``,
``while``) are evaluated at full precision, so recurrent families understate.

This is why every jbp check runs at "highest" (``jbp._report.PRECISION``): in
runs on a 2-core CPU (8 problems of mlp, cnn, transformer; 4 of resnet, llama)
jbp and jax.grad mostly agreed to ~1e-7 at either precision (they round the same
operands) but reached 5.9e-4 apart at TF32 and 8.6e-4 at one bf16 pass, over
the float32 tolerance 1e-4; each was off the truth by up to 2.5e-3 (MLP, CNN,
ResNet) and 3.4e-2 (transformers, on small leaves) at TF32, 2.4e-1 at bf16.

    python experiments/precision_emulation.py [--count 8] [--arch mlp,cnn,transformer]
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jbp
from jbp._losses import get_loss
from jbp._verify import _to64

jax.config.update("jax_enable_x64", True)

MANTISSA = {"tf32": 10, "bf16": 7}
ROUNDED = {"dot_general", "conv_general_dilated"}
CALLS = {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
         "custom_vjp_call", "custom_vjp_call_jaxpr"}  # fmt: skip


def _evaluate(jaxpr: Any, consts: list[Any], args: list[Any], mantissa: int) -> list[Any]:
    """Evaluate ``jaxpr`` with the float32 operands of every matmul and convolution
    rounded to ``mantissa`` bits, descending into nested calls."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if hasattr(v, "val") else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in CALLS:
            sub = next(
                eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params
            )
            inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, [])
            outs = _evaluate(inner, list(inner_consts), ins, mantissa)
        else:
            if name in ROUNDED and all(x.dtype == jnp.float32 for x in ins):
                ins = [lax.reduce_precision(x, 8, mantissa) for x in ins]
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = list(outs) if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def emulated(fn: Any, mantissa: int, *args: Any) -> Any:
    """``fn(*args)`` with every float32 matmul's operands rounded to ``mantissa`` bits."""
    flat, tree = jax.tree.flatten(args)

    def call(*leaves: Any) -> Any:
        return fn(*jax.tree.unflatten(tree, leaves))

    closed = jax.make_jaxpr(call)(*flat)
    out_tree = jax.tree.structure(jax.eval_shape(call, *flat))
    run = jax.jit(
        lambda *leaves: _evaluate(closed.jaxpr, list(closed.consts), list(leaves), mantissa)
    )
    return jax.tree.unflatten(out_tree, run(*flat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8, help="problems per family")
    parser.add_argument("--arch", default="mlp,cnn,transformer", help="comma-separated families")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    worst: dict[tuple[str, str], list[float]] = {}
    print("family  index  precision  jbp vs jax.grad  jbp vs float64  jax.grad vs float64")
    for arch in args.arch.split(","):
        for index in range(args.count):
            p = jbp.random_problem(np.random.default_rng((args.seed, index)), dtype="float32",
                                   arch=arch)  # fmt: skip
            loss, kw = get_loss(p.loss), p.keywords

            def manual(
                params: Any, x: Any, y: Any, p: Any = p, loss: Any = loss, kw: Any = kw
            ) -> Any:
                return jbp.backprop(p.net, loss)(params, x, y, **kw)

            def reference(
                params: Any, x: Any, y: Any, p: Any = p, loss: Any = loss, kw: Any = kw
            ) -> Any:
                return jax.grad(jbp.objective(p.net, loss))(params, x, y, **kw)

            with jax.default_matmul_precision("highest"):
                truth = jax.jit(reference)(_to64(p.params), _to64(p.x), _to64(p.y))
            for label, mantissa in MANTISSA.items():
                a = emulated(manual, mantissa, p.params, p.x, p.y)
                b = emulated(reference, mantissa, p.params, p.x, p.y)
                errs = [jbp.compare(a, b).max_rel_err, jbp.compare(a, truth).max_rel_err,
                        jbp.compare(b, truth).max_rel_err]  # fmt: skip
                w = worst.setdefault((arch, label), [0.0, 0.0, 0.0])
                worst[arch, label] = [max(u, v) for u, v in zip(w, errs, strict=True)]
                print(f"{arch:7} {index:5}  {label:9}  " + "  ".join(f"{e:15.1e}" for e in errs),
                      flush=True)  # fmt: skip
    print("\nworst per family and precision:")
    for (arch, label), errs in worst.items():
        print(f"{arch:11} {label:5} " + "  ".join(f"{e:.1e}" for e in errs))


if __name__ == "__main__":
    main()
