"""Hugging Face state dicts <-> the Flax model's parameters.

Checkpoint readers (``hf_checkpoint``, ``gguf_checkpoint``) return PyTorch-layout arrays under
Hugging Face names; this module is the one place that knows how those names map onto
:class:`models.llama.Llama`'s parameter tree.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import LlamaConfig
from models.errors import ModelLoadError
from models.llama import Llama


def _hf_name(path: tuple) -> tuple[str, bool]:
  """NNX parameter path -> (HF parameter name, needs transpose)."""
  parts = [str(p) for p in path]
  leaf = parts[-1]
  if parts[0] == "embed_tokens":
    return "model.embed_tokens.weight", False
  if parts[0] == "lm_head":
    return "lm_head.weight", True
  if parts[0] == "norm":
    return "model.norm.weight", False
  module = ".".join(parts[:-1])
  if leaf == "kernel":
    return f"model.{module}.weight", True
  return f"model.{module}.{leaf}", False  # 'weight' of a norm, or 'bias'


def model_from_hf_state(config: LlamaConfig, state: Mapping[str, np.ndarray],
                        dtype=jnp.float32) -> Llama:
  """Builds a :class:`Llama` whose parameters come from an HF-named state dict.

  Raises:
    ModelLoadError (a ValueError): a tensor is missing or has a shape the config does not
      expect.
  """
  abstract = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = []
  missing = []
  for path, var in nnx.to_flat_state(abstract_state):
    name, transpose = _hf_name(path)
    if name not in state:
      missing.append(name)
      continue
    arr = np.asarray(state[name])
    if transpose:
      arr = arr.T
    expected = var.get_value().shape
    if arr.shape != tuple(expected):
      raise ModelLoadError(
          f"Checkpoint tensor {name} has shape {arr.shape} (after layout change); the config "
          f"expects {tuple(expected)}.")
    flat.append((path, var.replace(jnp.asarray(arr, dtype=dtype))))
  if missing:
    raise ModelLoadError(
        f"Checkpoint is missing {len(missing)} tensor(s) the config needs, e.g. {missing[:3]}.")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_state_from_model(model: Llama) -> dict[str, np.ndarray]:
  """Inverse of :func:`model_from_hf_state` (float32 numpy, PyTorch layout)."""
  _, state = nnx.split(model)
  out = {}
  for path, var in nnx.to_flat_state(state):
    name, transpose = _hf_name(path)
    arr = np.asarray(var.get_value(), dtype=np.float32)
    out[name] = arr.T if transpose else arr
  return out
