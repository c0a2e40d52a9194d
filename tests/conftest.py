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
