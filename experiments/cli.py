"""How every binary starts: ``cli.run(main)`` in place of ``absl.app.run(main)``.

  if __name__ == '__main__':
    cli.run(main)

``run`` parses the flags, turns on the on-disk caches below before anything compiles or
loads, runs ``main``, and prints a user's error as one line on stderr with exit status 1 and
no traceback::

  generate: error: Unknown model 'llama-9000': not an embedded alias (smollm2-135m) and ...

A user's error is a bad flag value (``absl.app.UsageError``), a model that cannot be loaded
(``models.errors.ModelLoadError``: unknown alias, missing, corrupt or truncated checkpoint,
unsupported architecture) or a head profile that cannot be used
(``headkv_jax.profile.ProfileError``: missing, not JSON, malformed, another model's). Any other
exception is a bug and keeps its traceback.

The flags every binary has (defined here, not in ``experiments/flags.py``, because
``generate`` and the benchmarks define their own ``--model`` and cannot import that module):

  --compilation_cache_dir  JAX's persistent compilation cache: a program compiled once is read
                           back by the next process instead of compiled again ('' = off).
  --attention_impl         how compressed caches attend while decoding (auto / pallas / xla).
  --params_cache_dir       the converted parameters of the embedded models: the GGUF is
                           dequantized once, later loads read float32 / bfloat16 back ('' = off).

  --mesh                   the device mesh, e.g. data:2,model:4 (headkv_jax.sharding; '' = one
                           device): every ModelRunner the binary builds uses it.
  --coordinator_address, --num_processes, --process_id
                           a multi-process run (jax.distributed.initialize, before anything
                           starts JAX); unset values come from JAX_COORDINATOR_ADDRESS,
                           JAX_NUM_PROCESSES, JAX_PROCESS_ID or JAX's cluster detection.

The two cache directories default to directories under the user's cache root (``models.cache_dirs``:
``$HEADKV_JAX_CACHE``, else ``$XDG_CACHE_HOME/headkv_jax``, else ``~/.cache/headkv_jax``);
``$JAX_COMPILATION_CACHE_DIR``, when set, is the compilation cache's default instead.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import sys
from typing import Any, Callable

from absl import app
from absl import flags

from models import cache_dirs

# Programs that compile faster than this are cheaper to compile again than to read back
# (JAX's default, 1 s, leaves out most CPU programs of the caches and policies).
MIN_COMPILE_SECS = 0.1

_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir',
    os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(cache_dirs.cache_dir(cache_dirs.JAX_CACHE)),
    "JAX's persistent compilation cache (compiled programs reused across runs); '' disables "
    'it. Safe to delete.')
_ATTENTION_IMPL = flags.DEFINE_enum(
    'attention_impl', 'auto', ['auto', 'pallas', 'xla'],
    'How decode steps of the compressed caches attend: auto (the fused Pallas kernel on a '
    'GPU, XLA elsewhere), pallas (the kernel; interpret mode off a GPU, slow) or xla '
    '(dequantize-then-attend).')
_PARAMS_CACHE_DIR = flags.DEFINE_string(
    'params_cache_dir', str(cache_dirs.cache_dir(cache_dirs.PARAMS)),
    "Converted parameters of the embedded models (one file per model and dtype); '' disables "
    'it. Safe to delete.')

_MESH = flags.DEFINE_string(
    'mesh', '',
    "Device mesh 'data:D,model:M' (either axis may be left out; '' = one device): the batch "
    'is split over data, attention heads and the MLP over model where they divide (see '
    'headkv_jax.sharding). On CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N '
    'devices.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '',
    "host:port of process 0 in a multi-process run ('' = $JAX_COORDINATOR_ADDRESS, else a "
    "single process unless --num_processes > 1; 'auto' = JAX's cluster detection: TPU pods, "
    'SLURM, Open MPI, Kubernetes).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes of a multi-process run (default $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process in a multi-process run, 0-based (default $JAX_PROCESS_ID).')


def setup_distributed() -> bool:
  """``jax.distributed.initialize`` from the flags when a multi-process run is asked for."""
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  try:
    return sharding.initialize_distributed(_COORDINATOR.value or None, _NUM_PROCESSES.value,
                                           _PROCESS_ID.value)
  except (ValueError, RuntimeError) as e:
    raise app.UsageError(f'Cannot start the multi-process run: {e}') from e


def mesh_from_flag(text: str):
  """The ``jax.sharding.Mesh`` of a ``--mesh`` value (None for ''), or a UsageError."""
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  try:
    return sharding.make_mesh(text)
  except sharding.MeshError as e:
    raise app.UsageError(f'Bad --mesh={text!r}: {e}') from e


def setup_mesh() -> None:
  """Makes ``--mesh`` the mesh of every ``ModelRunner`` built without one."""
  from headkv_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.set_default_mesh(mesh_from_flag(_MESH.value))


def setup_compilation_cache(directory: str | os.PathLike | None) -> None:
  """Points JAX's persistent compilation cache at ``directory``; '' or None turns it off.

  Call it before the first compile: JAX decides once per process whether to use the cache
  (this resets that decision, so a later call still takes effect for new programs).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache

  if directory:
    jax.config.update('jax_enable_compilation_cache', True)
    jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(directory).expanduser()))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECS)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  else:
    jax.config.update('jax_enable_compilation_cache', False)
    jax.config.update('jax_compilation_cache_dir', None)
  jax_logger = logging.getLogger('jax._src.compilation_cache')
  level = jax_logger.level
  jax_logger.setLevel(logging.WARNING)  # not its INFO line "Resetting cache at <empty>."
  try:
    compilation_cache.reset_cache()
  finally:
    jax_logger.setLevel(level)


def setup_params_cache(directory: str | os.PathLike | None) -> None:
  """Makes ``directory`` the converted-params cache of the embedded models ('' / None: off)."""
  from models import loading  # pylint: disable=g-import-not-at-top

  loading.set_default_params_cache(directory or None)


def setup_caches() -> None:
  """Both caches from the parsed flags (what ``run`` does before ``main``)."""
  setup_compilation_cache(_COMPILATION_CACHE_DIR.value)
  setup_params_cache(_PARAMS_CACHE_DIR.value)


def setup_attention_impl() -> None:
  """Makes ``--attention_impl`` the process default of every compressed cache."""
  from headkv_jax import kernel_decode  # pylint: disable=g-import-not-at-top

  kernel_decode.set_default_impl(_ATTENTION_IMPL.value)


def cache_flags() -> list[str]:
  """The cache flags as ``--name=value`` arguments, for a binary that starts child processes."""
  return [flags.FLAGS[name].serialize() for name in ('compilation_cache_dir', 'params_cache_dir')]


def user_errors() -> tuple[type[Exception], ...]:
  """The exception types ``run`` prints as one line (imported when an error is raised)."""
  from headkv_jax.profile import ProfileError  # pylint: disable=g-import-not-at-top
  from models.errors import ModelLoadError  # pylint: disable=g-import-not-at-top

  return app.UsageError, ModelLoadError, ProfileError


def error_line(error: BaseException, program: str | None = None) -> str:
  """``'<program>: error: <message>'`` on one line (newlines and runs of spaces folded)."""
  program = program or pathlib.Path(sys.argv[0]).stem or 'headkv_jax'
  message = ' '.join(str(error).split()) or type(error).__name__
  return f'{program}: error: {message}'


def wrap(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` with the distributed runtime, caches and mesh set up first and a user's error
  printed as one line, exit 1."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      setup_distributed()  # before anything starts a JAX backend
      setup_caches()
      setup_attention_impl()
      setup_mesh()
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except  # re-raised unless a user error
      if not isinstance(e, user_errors()):
        raise
      sys.stdout.flush()
      print(error_line(e), file=sys.stderr)
      sys.exit(getattr(e, 'exitcode', 1) or 1)

  return wrapped


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` through :func:`wrap`: the entry point of every binary."""
  app.run(wrap(main))
