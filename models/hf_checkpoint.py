"""Reads a Hugging Face checkpoint directory into numpy arrays.

A directory written by `transformers`' `save_pretrained` holds `config.json` and either one
`model.safetensors` or shards `model-0000i-of-0000n.safetensors` listed in
`model.safetensors.index.json`. `read_hf_checkpoint` returns the config dict and every tensor
as float32 numpy, keyed by the PyTorch parameter name, in PyTorch layout (`[out, in]`):

  hf_config, state = read_hf_checkpoint("/path/to/SmolLM2-135M-Instruct")
  state["model.layers.0.self_attn.q_proj.weight"].shape  # (576, 576)

Tied embeddings: when `hf_config["tie_word_embeddings"]` is true, `state` never holds
`lm_head.weight` (the model reuses `model.embed_tokens.weight`); when false, it always does.

No torch at runtime: safetensors' numpy backend cannot hold bfloat16, so bf16 tensors are read
from the raw bytes (the file layout is an 8-byte header length, a JSON header, then the data)
and widened to float32 by bit shifting.
"""

import json
import os
import pathlib
import struct

import numpy as np
import safetensors

from models.errors import ModelLoadError, ModelNotFoundError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# The `architectures` entries of config.json this package runs, and their model_type.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}

# Buffers some older checkpoints saved that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_hf_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads `config.json` and all safetensors weights of a Hugging Face model directory.

  Args:
    path: the directory (as written by `save_pretrained` or downloaded from the hub).

  Returns:
    `(hf_config, state)`: the config.json dict (with `rope_theta`, `rope_scaling`, `head_dim`
    and `num_key_value_heads` filled in, see `normalize_hf_config`) and a dict from
    PyTorch parameter name to a float32 numpy array in PyTorch layout.

  Raises:
    ModelNotFoundError (a FileNotFoundError): the directory, its config.json, its weights or a
      listed shard is missing.
    ModelLoadError (a ValueError): config.json or a safetensors file cannot be parsed
      (truncated, corrupt), or config.json names an unsupported architecture.
  """
  hf_config = read_hf_config(path)
  directory = pathlib.Path(path)
  state = {}
  for shard in _weight_files(directory):
    state.update(read_safetensors(shard))
  for name in [n for n in state if n.endswith(_IGNORED_SUFFIXES)]:
    del state[name]
  _check_lm_head(hf_config, state, directory)
  return hf_config, state


def read_hf_config(path: str | os.PathLike) -> dict:
  """The normalized config.json of a Hugging Face directory, without reading its weights.

  Raises what :func:`read_hf_checkpoint` raises for the directory and its config.
  """
  directory = _checkpoint_dir(path)
  return normalize_hf_config(_read_config(directory), repr(str(directory / CONFIG_FILE)))


def normalize_hf_config(config: dict, source: str = "config") -> dict:
  """Fills in the values transformers derives, so every reader's config has the same keys.

  transformers 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}) where 4.x wrote
  `rope_theta` and `rope_scaling` (None for plain RoPE; older files say "type", not
  "rope_type"). The result has all three, consistent, plus `head_dim`, `num_key_value_heads`
  and `tie_word_embeddings` (Llama's default, false, when absent). Returns a new dict.
  `source` (the config's path) names it in errors; an unsupported architecture is reported
  before any missing key.
  """
  config = dict(config)
  check_architecture(config, source)
  for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
    if not isinstance(config.get(key), int):
      raise ModelLoadError(
          f"{source} has no integer {key!r} (got {config.get(key)!r}); keys: {sorted(config)}."
      )
  if config.get("head_dim") is None:
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
  if config.get("num_key_value_heads") is None:
    config["num_key_value_heads"] = config["num_attention_heads"]
  config.setdefault("tie_word_embeddings", False)

  params = config.get("rope_parameters")
  if isinstance(params, dict) and "rope_theta" in params:
    theta = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  else:
    theta = config.get("rope_theta", 10000.0)
    scaling = dict(config.get("rope_scaling") or {})
  if "type" in scaling:  # the pre-4.45 spelling
    scaling.setdefault("rope_type", scaling.pop("type"))
  scaling.setdefault("rope_type", "default")
  config["rope_theta"] = float(theta)
  config["rope_scaling"] = None if scaling == {"rope_type": "default"} else scaling
  config["rope_parameters"] = {**scaling, "rope_theta": float(theta)}
  return config


def check_architecture(config: dict, source: str = "config") -> None:
  """Raises ModelLoadError unless `architectures` and `model_type` are ones this package runs.

  A config without `architectures` is judged by its `model_type` (default "llama").
  """
  model_type = config.get("model_type", "llama")
  architectures = config.get("architectures") or []
  if isinstance(architectures, str):
    architectures = [architectures]
  unknown = [a for a in architectures if a not in SUPPORTED_ARCHITECTURES]
  if not unknown and model_type in SUPPORTED_ARCHITECTURES.values():
    return
  name = ", ".join(map(str, unknown)) if unknown else f"with model_type {model_type!r}"
  types = ", ".join(dict.fromkeys(SUPPORTED_ARCHITECTURES.values()))
  raise ModelLoadError(
      f"{source}: unsupported architecture {name} (model_type {model_type!r}); supported: "
      f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {types}).")


def _checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  """``path`` as a directory that exists (ModelNotFoundError otherwise)."""
  directory = pathlib.Path(path)
  if not directory.exists():
    raise ModelNotFoundError(
        f"Hugging Face checkpoint directory {str(directory)!r} does not exist.")
  if not directory.is_dir():
    raise ModelNotFoundError(
        f"{str(directory)!r} is not a directory; a Hugging Face checkpoint is a directory with "
        f"{CONFIG_FILE} and *.safetensors files (for a .gguf file use read_gguf_checkpoint)."
    )
  return directory


def _read_config(directory: pathlib.Path) -> dict:
  config_path = directory / CONFIG_FILE
  if not config_path.is_file():
    raise ModelNotFoundError(
        f"{str(directory)!r} has no {CONFIG_FILE}; found {_listing(directory)}."
    )
  try:
    config = json.loads(config_path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ModelLoadError(f"{str(config_path)!r} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise ModelLoadError(
        f"{str(config_path)!r} holds a {type(config).__name__}, expected an object.")
  return config


def _weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint: the index's shards, or the single file."""
  index_path = directory / INDEX_FILE
  if index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise ModelLoadError(
          f"{str(index_path)!r} is not a safetensors index (JSON with a 'weight_map'): {e!r}"
      ) from None
    shards = [directory / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
      raise ModelNotFoundError(
          f"{str(index_path)!r} lists shards missing from {str(directory)!r}: {missing}."
      )
    return shards
  single = directory / SINGLE_FILE
  if single.is_file():
    return [single]
  raise ModelNotFoundError(
      f"{str(directory)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; found {_listing(directory)}."
  )


def _check_lm_head(hf_config: dict, state: dict, directory: pathlib.Path) -> None:
  """Makes `lm_head.weight` present exactly when the embeddings are untied."""
  if "model.embed_tokens.weight" not in state:
    raise ModelLoadError(
        f"{str(directory)!r} has no 'model.embed_tokens.weight'; is it a LlamaForCausalLM-style "
        f"checkpoint? First names: {sorted(state)[:5]}."
    )
  if hf_config["tie_word_embeddings"]:
    state.pop("lm_head.weight", None)
  elif "lm_head.weight" not in state:
    raise ModelLoadError(
        f"{str(directory)!r}: config.json says tie_word_embeddings=false but the weights have "
        "no 'lm_head.weight'."
    )


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every tensor of one safetensors file as float32 numpy (bf16 included).

  Raises:
    ModelNotFoundError (a FileNotFoundError): the file does not exist.
    ModelLoadError (a ValueError): the file is truncated or not a safetensors file (the message
      names it).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ModelNotFoundError(f"safetensors file {str(path)!r} does not exist.")
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      tensors = {}
      raw = None
      for name in f.keys():
        if f.get_slice(name).get_dtype() == "BF16":
          raw = raw if raw is not None else _RawSafetensors(path)
          tensors[name] = raw.bf16_as_float32(name)
        else:
          tensors[name] = np.asarray(f.get_tensor(name), dtype=np.float32)
      return tensors
  except safetensors.SafetensorError as e:
    raise ModelLoadError(
        f"cannot read safetensors file {str(path)!r} (truncated or corrupt?): {e}"
    ) from None


class _RawSafetensors:
  """The raw byte view of a safetensors file, for dtypes numpy has no name for."""

  def __init__(self, path: pathlib.Path):
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      self.header = json.loads(f.read(header_len))
    self.path = path
    self.data_start = 8 + header_len

  def bf16_as_float32(self, name: str) -> np.ndarray:
    entry = self.header[name]
    start, end = entry["data_offsets"]
    bits = np.fromfile(self.path, dtype="<u2", count=(end - start) // 2,
                       offset=self.data_start + start)  # [numel] raw bf16 bits
    # bf16 is the top half of a float32: shift into place, reinterpret.
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _listing(directory: pathlib.Path, limit: int = 10) -> str:
  names = sorted(p.name for p in directory.iterdir())
  if not names:
    return "an empty directory"
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more
