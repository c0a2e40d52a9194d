"""Shared pytest set-up: keep JAX on the CPU and quiet, and compile for the tests' needs."""

import os

# The tests check what programs compute, not how fast XLA's code runs, and most of their time
# is compiling on the CPU: XLA's backend optimisation level 0 without its expensive LLVM passes
# compiles about 40% faster (same results). Subprocess tests pass it on to their workers. Set
# XLA_FLAGS yourself to test with other compiler options.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)

import pytest

from headkv_jax import memory_maps


@pytest.fixture(autouse=True)
def _release_executables_near_the_map_limit():
  """A whole suite in one process compiles enough programs to pass Linux's memory-map limit
  (the process then dies with a segmentation fault mid-suite): after each test, drop every
  cached executable once the process holds half its limit (``headkv_jax.memory_maps``)."""
  yield
  memory_maps.release_near_limit(memory_maps.FRACTION)
