"""An on-disk cache of converted parameters: a checkpoint read once, reloaded in a second.

Reading the embedded SmolLM2 GGUF (dequantizing Q4_1, undoing llama.cpp's q/k permutation) and
building the Flax model takes ~7 s on a 2-core CPU; reading the converted float32 parameters
back from one safetensors file takes ~1 s (see ``restore``).

  path = entry_path(cache_dir, source, jnp.float32)  # <cache_dir>/<stem>-float32-<key>.safetensors
  model = restore(path, jnp.float32)                 # None: no entry, or an unusable one
  if model is None:
    model = convert(...)
    save(model, path)

An entry is one safetensors file: every nnx variable of the model under its '/'-joined path
(bfloat16 stored as its uint16 bits) and, in the metadata, the model's nnx graph definition and
abstract state, pickled (building them with ``nnx.eval_shape`` costs ~2 s of tracing 210
initialisers). Its key hashes the source's resolved path, size and mtime (for a directory,
those of every file in it), the dtype, this cache's format, the flax and jax versions and the
source code of the `models/` modules that loading imports (the model class, its config, the
converters and readers), so an edited checkpoint, converter or model misses the cache. A
corrupt, truncated or stale entry is reported with a warning and converted again, never fatal;
saving is atomic (a temporary file renamed into place) and replaces the older entries of the
same source name and dtype, so the cache holds one file per model and dtype.

Like JAX's compilation cache, the directory is trusted (an entry holds a pickle): keep it
where only you can write, which the default (``~/.cache/headkv_jax/params``) is.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import logging
import os
import pathlib
import pickle
import tempfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models.llama import Llama

FORMAT = "headkv_jax.params/2"  # bump when the entry layout changes
SUFFIX = ".safetensors"
# The code that decides the cached graph and values: the modules of this package that loading
# and this cache import, directly or through each other (the model and its layers, its config,
# the converters and readers; see _code_files), so an edit there converts once more and an
# edit of generation or the runner does not.
_CODE_DIR = pathlib.Path(__file__).resolve().parent
_CODE_ROOTS = ("loading", "params_cache")
# dtypes safetensors' numpy backend cannot hold, stored as same-width unsigned bits.
_AS_BITS = {jnp.dtype(jnp.bfloat16): np.uint16}


def entry_path(directory: str | os.PathLike, source: pathlib.Path, dtype) -> pathlib.Path:
  """The cache file of ``source`` (a GGUF file or HF directory) converted to ``dtype``."""
  name = jnp.dtype(dtype).name
  raw = "|".join([FORMAT, str(source.resolve()), _stamp(source), name, _code_digest()])
  key = hashlib.sha256(raw.encode()).hexdigest()[:16]
  return pathlib.Path(directory) / f"{source.stem}-{name}-{key}{SUFFIX}"


def _stamp(source: pathlib.Path) -> str:
  """Size and mtime of a file, or of every file directly in a directory."""
  files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
  return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _code_files() -> list[pathlib.Path]:
  """The ``models/`` modules :data:`_CODE_ROOTS` import, transitively (read from their
  ``import`` statements, so a module added to that chain is hashed without a list to edit)."""
  package = _CODE_DIR.name
  seen, todo = set(), list(_CODE_ROOTS)
  while todo:
    name = todo.pop()
    path = _CODE_DIR / f"{name}.py"
    if name in seen or not path.is_file():
      continue
    seen.add(name)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.ImportFrom) and node.module == package:
        todo += [alias.name for alias in node.names]  # from models import x
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
        todo.append(node.module.split(".")[1])  # from models.x import y
      elif isinstance(node, ast.Import):
        todo += [a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")]
  return sorted(_CODE_DIR / f"{name}.py" for name in seen)


@functools.cache
def _code_digest() -> str:
  """A hash of the library versions and model code an entry was written with."""
  digest = hashlib.sha256(f"flax {flax.__version__} jax {jax.__version__}".encode())
  for path in _code_files():
    digest.update(path.name.encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()[:16]


def _flat_name(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def save(model: Llama, path: pathlib.Path) -> None:
  """Writes ``model``'s variables and graph to ``path``; an OSError only skips caching."""
  graphdef, state = nnx.split(model)
  tensors = {}
  for var_path, var in nnx.to_flat_state(state):
    array = np.asarray(var.get_value())
    bits = _AS_BITS.get(array.dtype)
    tensors[_flat_name(var_path)] = np.ascontiguousarray(array.view(bits) if bits else array)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  graph = base64.b64encode(pickle.dumps((graphdef, abstract))).decode("ascii")
  metadata = {"format": FORMAT, "graph": graph}
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".staging-", suffix=SUFFIX)
    os.close(fd)
  except OSError as e:
    logging.warning("not caching converted params in %s: %s", path.parent, e)
    return
  try:
    save_file(tensors, staging, metadata=metadata)
    os.replace(staging, path)
  except OSError as e:  # disk full, read-only: the model is loaded all the same
    logging.warning("not caching converted params at %s: %s", path, e)
    pathlib.Path(staging).unlink(missing_ok=True)
    return
  _remove_older_entries(path)


def _remove_older_entries(path: pathlib.Path) -> None:
  """Deletes the other entries of the same source name and dtype (stale keys)."""
  prefix = path.name[:-len(SUFFIX)].rsplit("-", 1)[0] + "-"
  try:
    for other in path.parent.iterdir():
      key = other.name[len(prefix):-len(SUFFIX)]
      if (other.name.startswith(prefix) and other.name.endswith(SUFFIX) and other != path
          and "-" not in key):
        other.unlink(missing_ok=True)
  except OSError:  # another process removed or holds it: harmless
    pass


def restore(path: pathlib.Path, dtype) -> Llama | None:
  """The model saved at ``path``, or None (no entry; a corrupt or stale one is warned about)."""
  if not path.is_file():
    return None
  try:
    return _read(path, jnp.dtype(dtype))
  except Exception as e:  # pylint: disable=broad-except  # any unreadable entry is rebuilt
    logging.warning("ignoring unreadable params cache entry %s (converting again): %s: %s",
                    path, type(e).__name__, e)
    return None


def _read(path: pathlib.Path, dtype) -> Llama:
  with safe_open(str(path), framework="numpy") as f:
    metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
      raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    graphdef, abstract_state = pickle.loads(base64.b64decode(metadata["graph"]))
    names = set(f.keys())
    flat = []
    for var_path, var in nnx.to_flat_state(abstract_state):
      name = _flat_name(var_path)
      expected = var.get_value()
      if jnp.issubdtype(expected.dtype, jnp.floating) and expected.dtype != dtype:
        raise ValueError(f"{name} is {expected.dtype}, not the requested {dtype}")
      array = f.get_tensor(name)  # KeyError: a variable the entry lacks
      names.discard(name)
      if expected.dtype in _AS_BITS:
        array = array.view(expected.dtype)
      if array.shape != expected.shape or array.dtype != expected.dtype:
        raise ValueError(f"{name} is {array.dtype}{list(array.shape)}, the model expects "
                         f"{expected.dtype}{list(expected.shape)}")
      flat.append((var_path, var.replace(jax.device_put(array))))
    if names:
      raise ValueError(f"tensors the model does not have: {sorted(names)[:3]}")
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  if not isinstance(model, Llama):
    raise ValueError(f"the entry holds a {type(model).__name__}, not a Llama")
  return model
