"""Strict numerics for every test: float64 available, no implicit rank promotion."""

import gc
import os

# Four simulated CPU devices for the sharding tests; XLA reads the flag when
# JAX starts its backend, which no import below does.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=4".strip()

# `jbp verify` run in-process keeps no compiled programs on disk during tests (a
# test that checks the cache sets its own directory).
os.environ.setdefault("JBP_XLA_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from jbp import _activations  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Hypothesis profiles: "ci" keeps the whole run within minutes on 2 cores
# (tests give their example counts for 25 and scale them by max_examples / 25,
# so ci runs 80% of them); "thorough" is for long sweeps
# (HYPOTHESIS_PROFILE=thorough pytest).
_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=20, derandomize=True, **_common)
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
