"""The ``jbp`` command line: ``jbp verify``, ``jbp train`` (more subcommands to come).

Every subcommand lives in its own module ``jbp/cli/_<name>.py`` as a pair of
functions: ``add_<name>(subparsers)`` declares its options and sets
``run=_run_<name>`` and ``subparser``; ``_run_<name>(args, subparser) -> int``
does the work with the public ``jbp`` API and returns the exit status. Add a
subcommand by writing the module and calling its ``add_<name>`` in
:func:`build_parser`.

Exit status: 0 when everything passed, 1 on a failure (a gradient mismatch, a
diverged run), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jbp

from ._bench import add_bench
from ._per_example import add_per_example
from ._train import add_train
from ._verify import add_verify


def build_parser() -> argparse.ArgumentParser:
    """The ``jbp`` argument parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="jbp",
        description="Hand-written backprop from the δ equations, checked against jax.grad.",
    )
    parser.add_argument("--version", action="version", version=f"jbp {jbp.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_verify(subparsers)
    add_train(subparsers)
    add_per_example(subparsers)
    add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jbp`` command line.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0 on success, 1 on a gradient mismatch, 2 on bad
      arguments (argparse's usage error, also for ``--help``'s 0).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.run(args, args.subparser))
    except SystemExit as e:  # argparse's --help/--version (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    raise SystemExit(main())
