"""Strict numerics for every test: float64 available, no implicit rank promotion."""

import gc
import os
import subprocess
import sys
import tempfile
from xml.etree import ElementTree

# Four simulated CPU devices for the sharding tests (they pin jax.devices("cpu"),
# so a GPU/TPU machine has them too); XLA reads the flag when JAX starts its
# backend, which no import below does. An explicit flag wins: e.g.
# XLA_FLAGS=--xla_force_host_platform_device_count=1 shows what a one-device
# machine skips (each skip says why).
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=4".strip()

# Device-agnostic numerics: float32 matmuls at full precision on every backend
# (GPUs default to TF32, TPUs to one bfloat16 pass; a CPU computes float32 either
# way), so tolerances tuned on a CPU hold everywhere. Set in the environment, the
# child processes that tests start inherit it; a test of lower-precision behaviour
# sets its own (jax.config.update or jax.default_matmul_precision). Run the suite
# with JAX_DEFAULT_MATMUL_PRECISION=default to see the device's own default.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# On a GPU, no process a test starts (the child pytest below, CLI subprocesses,
# the two-process run) grabs 75% of the memory up front as JAX does by default.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# `jbp verify` run in-process keeps no compiled programs on disk during tests (a
# test that checks the cache sets its own directory).
os.environ.setdefault("JBP_XLA_CACHE", "off")

# Compiling is most of the run (thousands of small programs, each run a few times),
# and LLVM's backend optimisations cost more compile time than they save at run
# time: the tests compile with LLVM at -O0 (XLA's default is 3), about a third
# faster overall. XLA's HLO passes are not affected (the optimised HLO is the same);
# the numbers differ from the -O3 code only in the last bits (contraction,
# summation order), which every comparison allows for, except the tests marked
# ``default_codegen``: they pin problems whose reference fails by its round-off at
# -O3, so they run in a child process with XLA's default (see pytest_pyfunc_call).
# Set the flag yourself (e.g. =3) to run everything at that level in one process.
_OPT_FLAG = "--xla_backend_optimization_level"
_CHILD = "JBP_TESTS_DEFAULT_CODEGEN"  # set for the child process below
_LOWERED = _OPT_FLAG not in os.environ["XLA_FLAGS"] and _CHILD not in os.environ
_DEFAULT_FLAGS = os.environ["XLA_FLAGS"]
if _LOWERED:
    os.environ["XLA_FLAGS"] = f"{_DEFAULT_FLAGS} {_OPT_FLAG}=0"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jbp import _activations  # noqa: E402

jax.config.update("jax_enable_x64", True)
# Again, in case a plugin imported JAX before the environment was set.
jax.config.update("jax_default_matmul_precision", os.environ["JAX_DEFAULT_MATMUL_PRECISION"])
jax.config.update("jax_numpy_rank_promotion", "raise")

# Hypothesis profiles: "ci" keeps the whole run within minutes on 2 cores
# (tests give their example counts for 25 and scale them by max_examples / 25,
# so ci runs 56% of them: 14, trimmed from 20 and then 16 when the suite reached
# 15 min);
# "thorough" is for long sweeps (HYPOTHESIS_PROFILE=thorough pytest).
_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=14, derandomize=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("thorough", max_examples=500, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Free each module's compiled programs when it is done: hundreds of live
    executables and their traces make every later compile slower."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _restore_activation_registry():
    """Activations a test registers (some deliberately wrong) do not leak into the
    strategies that later tests draw from."""
    before = dict(_activations._REGISTRY)
    yield
    _activations._REGISTRY.clear()
    _activations._REGISTRY.update(before)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "default_codegen: pins round-off of XLA's default -O3 code; under the suite's -O0 "
        "it runs in a child process at the default level",
    )


_CHILD_RESULTS: dict[str, dict[str, tuple[str, str]]] = {}


def _child_results(item):
    """Run every ``default_codegen`` test of ``item``'s file in one child pytest whose
    XLA compiles at its default level; ``{nodeid: (outcome, text)}``."""
    key = str(item.path)
    if key not in _CHILD_RESULTS:
        marked = [
            i.nodeid
            for i in item.session.items
            if i.path == item.path and i.get_closest_marker("default_codegen")
        ]
        with tempfile.TemporaryDirectory() as tmp:
            xml = os.path.join(tmp, "child.xml")
            child = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 f"--junitxml={xml}", *marked],
                cwd=item.config.rootpath,
                env={**os.environ, "XLA_FLAGS": _DEFAULT_FLAGS, _CHILD: "1"},
                capture_output=True,
                text=True,
                timeout=900,
            )  # fmt: skip
            output = f"child pytest exit {child.returncode}:\n{child.stdout[-8000:]}"
            results = dict.fromkeys(marked, ("failed", f"not run by the child; {output}"))
            if os.path.exists(xml):
                prefix = item.nodeid.split("::")[0]
                for case in ElementTree.parse(xml).iter("testcase"):
                    outcome, text = "passed", ""
                    for e in case:
                        if e.tag in ("failure", "error", "skipped"):
                            outcome = "skipped" if e.tag == "skipped" else "failed"
                            text += f"{e.tag}: {e.get('message')}\n{e.text}\n"
                    results[f"{prefix}::{case.get('name')}"] = (outcome, text)
        _CHILD_RESULTS[key] = results
    return _CHILD_RESULTS[key][item.nodeid]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Under -O0 a ``default_codegen`` test runs in the child (one per file): it passes
    here if and only if it passed there."""
    if not (_LOWERED and pyfuncitem.get_closest_marker("default_codegen")):
        return None
    outcome, text = _child_results(pyfuncitem)
    if outcome == "skipped":
        pytest.skip(f"skipped in the child: {text}")
    assert outcome == "passed", f"{pyfuncitem.nodeid} at XLA's default codegen:\n{text}"
    return True


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (long runs) are skipped unless ``-m`` names them
    (``pytest -m slow``), as pyproject's marker text says."""
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run it with -m slow")
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(skip)
