"""Keeping a long-lived process under Linux's per-process memory-map limit.

XLA:CPU maps every compiled kernel's code into pages of its own, about three mappings per
kernel, and keeps each executable while JAX's caches hold it. A process that compiles many
programs (a test suite, an experiment grid, a loop of prompts through the library) passes the
kernel's limit of 65,530 mappings per process (``/proc/sys/vm/max_map_count``) long before it
runs short of memory; LLVM then fails to map code ("Cannot allocate memory") and the process
dies with a segmentation fault. :func:`release_near_limit` is the one guard every such loop
calls between units of work: past a fraction of the limit it drops JAX's cached executables
(later calls compile again), otherwise it keeps them, so programs that are reused stay
compiled.
"""

import gc

import jax

FRACTION = 0.5  # of the limit: far enough below it for the next unit's compiles


def memory_maps() -> tuple[int, int] | None:
  """``(mappings this process holds, the kernel's per-process limit)``, or None off Linux."""
  try:
    with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
      return sum(1 for _ in maps), int(limit.read())
  except (OSError, ValueError):
    return None


def release_near_limit(fraction: float = FRACTION) -> bool:
  """Drops every cached executable (``jax.clear_caches()``, then a garbage collection that
  unmaps their code) when the process holds more than ``fraction`` of its memory-map limit.
  Returns whether it did. Reading the map count costs about a millisecond per 10k maps."""
  counts = memory_maps()
  if counts is None or counts[0] <= counts[1] * fraction:
    return False
  jax.clear_caches()
  gc.collect()
  return True


__all__ = ["FRACTION", "memory_maps", "release_near_limit"]
