"""Where headkv_jax keeps its on-disk caches: one root, one subdirectory per cache.

The root is ``$HEADKV_JAX_CACHE``, else ``$XDG_CACHE_HOME/headkv_jax``, else
``~/.cache/headkv_jax``; under it:

  tokenizers/  GGUF vocabularies converted to transformers tokenizers (models.tokenizer)
  params/      converted parameters of the embedded models (models.loading, the binaries)
  jax_cache/   JAX's persistent compilation cache (the binaries, experiments.cli)

Every entry can be deleted at any time (it is rebuilt on the next use).
"""

import os
import pathlib

TOKENIZERS = "tokenizers"
PARAMS = "params"
JAX_CACHE = "jax_cache"


def cache_root() -> pathlib.Path:
  """The root of every on-disk cache (see the module docstring for the order of lookup)."""
  root = os.environ.get("HEADKV_JAX_CACHE")
  if root:
    return pathlib.Path(root).expanduser()
  xdg = os.environ.get("XDG_CACHE_HOME")
  base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
  return base / "headkv_jax"


def cache_dir(name: str) -> pathlib.Path:
  """``cache_root() / name``, e.g. ``cache_dir(JAX_CACHE)``; not created here."""
  return cache_root() / name
