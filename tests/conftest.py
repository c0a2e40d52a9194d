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

import gc

import jax
import pytest


def _memory_maps() -> tuple[int, int] | None:
  """(mappings this process holds, the kernel's per-process limit), or None off Linux."""
  try:
    with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
      return sum(1 for _ in maps), int(limit.read())
  except OSError:
    return None


@pytest.fixture(autouse=True)
def _release_executables_near_the_map_limit():
  """XLA:CPU maps every compiled kernel's code into its own few pages, and a whole suite in
  one process compiles enough programs to pass Linux's 65,530 mappings per process: LLVM then
  fails to map code and the process dies with a segmentation fault mid-suite. After any test
  that leaves the process past half its limit, drop every cached executable (a later test
  that needs one compiles it again)."""
  yield
  counts = _memory_maps()
  if counts is not None and counts[0] > counts[1] // 2:
    jax.clear_caches()
    gc.collect()
