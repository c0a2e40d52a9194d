"""Keeping a long-lived process under Linux's per-process memory-map limit.

XLA:CPU maps every compiled kernel's code into pages of its own, about three mappings per
kernel, and keeps each executable while JAX's caches hold it. A process that compiles many
programs (a test suite, an experiment grid, a loop of prompts through the library) passes the
kernel's limit of 65,530 mappings per process (``/proc/sys/vm/max_map_count``) long before it
runs short of memory; LLVM then fails to map code ("Cannot allocate memory") and the process
dies with a segmentation fault. :func:`release_near_limit` is the one guard every such loop
calls between units of work (a prompt's prefill, a method's decoding, a grid cell): when the
next unit might not fit under the limit it drops JAX's cached executables (later calls
compile again), otherwise it keeps them, so programs that are reused stay compiled.

Room for the next unit is judged from the units before it: twice the largest growth seen
between two calls, and never less than :data:`HEADROOM` of the limit (the first unit has no
history). A loop of 2,000-token prompts through eight methods holds ~28k mappings per size
class of programs; a fixed half-the-limit rule dropped them all in the second class and
compiled every method again, the adaptive rule keeps both classes.
"""

import gc

import jax

FRACTION = 0.5  # the fixed rule's default fraction of the limit (``fraction=FRACTION``)
HEADROOM = 0.3  # of the limit: the least room the adaptive rule keeps for the next unit

_largest_step = 0  # the most mappings one unit added (between two adaptive calls)
_last_count: int | None = None


def memory_maps() -> tuple[int, int] | None:
  """``(mappings this process holds, the kernel's per-process limit)``, or None off Linux."""
  try:
    with open("/proc/self/maps") as maps, open("/proc/sys/vm/max_map_count") as limit:
      return sum(1 for _ in maps), int(limit.read())
  except (OSError, ValueError):
    return None


def release_near_limit(fraction: float | None = None) -> bool:
  """Drops every cached executable (``jax.clear_caches()``, then a garbage collection that
  unmaps their code) when the process is near its memory-map limit; returns whether it did.

  ``fraction=None`` (the adaptive rule): when the mappings held plus room for the next unit
  (twice the largest growth between two such calls, at least :data:`HEADROOM` of the limit)
  pass the limit. A ``fraction``: when the mappings held pass ``fraction`` of the limit (a
  fixed rule, for callers whose units vary too much to judge by the last ones, like a test
  suite). Reading the map count costs about a millisecond per 10k maps.
  """
  global _largest_step, _last_count
  counts = memory_maps()
  if counts is None:
    return False
  held, limit = counts
  if fraction is not None:
    release = held > limit * fraction
  else:
    if _last_count is not None:
      _largest_step = max(_largest_step, held - _last_count)
    release = held + max(2 * _largest_step, limit * HEADROOM) > limit
  if release:
    jax.clear_caches()
    gc.collect()
    held = memory_maps()[0]
  if fraction is None:
    _last_count = held
  return release


__all__ = ["FRACTION", "HEADROOM", "memory_maps", "release_near_limit"]
