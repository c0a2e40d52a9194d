"""Reads a llama.cpp GGUF file into a Hugging Face style config and float32 numpy weights.

  hf_config, state = read_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
  state["model.layers.0.self_attn.q_proj.weight"].shape  # (576, 576), PyTorch [out, in]

The result has the same contract as `models.hf_checkpoint.read_hf_checkpoint`: the names and
layout of transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` state_dict, quantized tensors
dequantized with `gguf.quants.dequantize`, and no `lm_head.weight` when the file has no
`output.weight` (tied embeddings).

llama.cpp's converter (`convert_hf_to_gguf.py`, LlamaModel.modify_tensors) permutes the rows of
q_proj and k_proj for the `llama` architecture, from Hugging Face's rotate-half RoPE layout to
GPT-J's interleaved one; this reader undoes that. `qwen2` files are stored unpermuted (llama.cpp
runs them with NEOX-style RoPE). Mistral models converted by llama.cpp use the `llama`
architecture and come back as model_type "llama" (same tensors; GGUF keeps no sliding window).

Llama 3.x files carry their RoPE scaling as a `rope_freqs.weight` tensor of per-frequency
divisors, not as metadata; it is turned back into the `llama3` rope_scaling dict when it matches
the standard Llama 3 parameters.
"""

import math
import os
import pathlib
import re

import gguf
import numpy as np

from models import hf_checkpoint
from models.errors import ModelLoadError, ModelNotFoundError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# The Llama 3 RoPE scaling constants convert_hf_to_gguf.py bakes into rope_freqs.weight.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def read_gguf_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads the config and all weights of a GGUF file, dequantized to float32.

  Args:
    path: a `.gguf` file of a supported architecture (`SUPPORTED_ARCHITECTURES`).

  Returns:
    `(hf_config, state)`: a config.json-style dict and a dict from Hugging Face parameter name
    to float32 numpy array in PyTorch layout.

  Raises:
    ModelNotFoundError (a FileNotFoundError): `path` does not exist.
    ModelLoadError (a ValueError): the file is not a readable GGUF file, its architecture is
      unsupported, or a tensor has an unknown name or a quantization `gguf` cannot dequantize.
  """
  reader = open_gguf(path)
  arch = _architecture(reader, path)
  tensors = {t.name: t for t in reader.tensors}
  hf_config = _hf_config(reader, arch, tensors, path)
  state = {}
  for name, tensor in tensors.items():
    if name == "rope_freqs.weight":
      continue  # folded into hf_config["rope_scaling"]
    weights = _dequantize(tensor, path)
    if arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias")):
      weights = _unpermute_rows(weights, hf_config["num_attention_heads"])
    elif arch == "llama" and name.endswith((".attn_k.weight", ".attn_k.bias")):
      weights = _unpermute_rows(weights, hf_config["num_key_value_heads"])
    state[_hf_name(name, path)] = weights
  return hf_config, state


def read_gguf_config(path: str | os.PathLike) -> dict:
  """The config.json-style dict of a GGUF file, without dequantizing its weights.

  Raises what :func:`read_gguf_checkpoint` raises for the file and its metadata.
  """
  reader = open_gguf(path)
  arch = _architecture(reader, path)
  return _hf_config(reader, arch, {t.name: t for t in reader.tensors}, path)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """Opens a GGUF file, turning the reader's low-level failures into one clear error."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist.")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader fails with struct, numpy and index errors alike
    raise ModelLoadError(
        f"cannot read GGUF file {str(path)!r} (truncated or not GGUF?): {type(e).__name__}: {e}"
    ) from None


def _architecture(reader: gguf.GGUFReader, path) -> str:
  arch = _field(reader, "general.architecture", path)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ModelLoadError(
        f"GGUF file {str(path)!r} has unsupported architecture {arch!r}; supported: "
        f"{SUPPORTED_ARCHITECTURES}."
    )
  return arch


def _field(reader: gguf.GGUFReader, key: str, path, default=...):
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ModelLoadError(f"GGUF file {str(path)!r} has no metadata key {key!r}.")
    return default
  return field.contents()


def _hf_config(reader: gguf.GGUFReader, arch: str, tensors: dict, path) -> dict:
  """The config.json equivalent of the GGUF metadata, as transformers would write it."""
  meta = lambda key, default=...: _field(reader, f"{arch}.{key}", path, default)
  hidden_size = meta("embedding_length")
  num_heads = meta("attention.head_count")
  num_kv_heads = meta("attention.head_count_kv", num_heads)
  if isinstance(num_kv_heads, list):
    raise ModelLoadError(
        f"GGUF file {str(path)!r} has per-layer KV head counts {num_kv_heads}; only one "
        "count for all layers is supported."
    )
  head_dim = meta("attention.key_length", hidden_size // num_heads)
  rotary_dim = meta("rope.dimension_count", head_dim)
  if rotary_dim != head_dim:
    raise ModelLoadError(
        f"GGUF file {str(path)!r} rotates {rotary_dim} of {head_dim} head dims; only full "
        "rotary embeddings are supported."
    )
  if "token_embd.weight" not in tensors:
    raise ModelLoadError(f"GGUF file {str(path)!r} has no 'token_embd.weight' tensor.")
  rope_theta = _short_float(meta("rope.freq_base", 10000.0))
  config = {
      "architectures": [_HF_ARCHITECTURES[arch]],
      "model_type": arch,
      # token_embd is [vocab, hidden] in numpy order; GGUF lists shapes innermost first.
      "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
      "hidden_size": hidden_size,
      "intermediate_size": meta("feed_forward_length"),
      "num_hidden_layers": meta("block_count"),
      "num_attention_heads": num_heads,
      "num_key_value_heads": num_kv_heads,
      "head_dim": head_dim,
      "max_position_embeddings": meta("context_length"),
      "rms_norm_eps": _short_float(meta("attention.layer_norm_rms_epsilon")),
      "rope_theta": rope_theta,
      "rope_scaling": _rope_scaling(reader, arch, tensors, rope_theta, head_dim, path),
      "tie_word_embeddings": "output.weight" not in tensors,
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "mlp_bias": False,
      "hidden_act": "silu",
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", path, None),
      "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", path, None),
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", path, None),
  }
  return hf_checkpoint.normalize_hf_config(config, f"GGUF file {str(path)!r}")


def _short_float(value: float) -> float:
  """A float32 metadata value as its shortest decimal: 1e-05, not 9.999999747378752e-06."""
  return float(str(np.float32(value)))


def _rope_scaling(reader, arch, tensors, rope_theta, head_dim, path) -> dict | None:
  """rope_scaling from `{arch}.rope.scaling.*` metadata or a Llama 3 `rope_freqs` tensor."""
  kind = _field(reader, f"{arch}.rope.scaling.type", path, "none")
  factor = _field(reader, f"{arch}.rope.scaling.factor", path, None)
  if kind == "linear" and factor is not None:
    return {"rope_type": "linear", "factor": float(factor)}
  if kind == "yarn" and factor is not None:
    original = _field(reader, f"{arch}.rope.scaling.original_context_length", path)
    return {"rope_type": "yarn", "factor": float(factor),
            "original_max_position_embeddings": int(original)}
  if kind not in ("none", "linear", "yarn"):
    raise ModelLoadError(
        f"GGUF file {str(path)!r} has rope.scaling.type {kind!r}; supported: none, linear, yarn."
    )
  if "rope_freqs.weight" in tensors:
    divisors = _dequantize(tensors["rope_freqs.weight"], path).reshape(-1)  # [head_dim // 2]
    return llama3_rope_scaling(divisors, rope_theta, head_dim, path)
  return None


def llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int,
                        path="<rope_freqs>") -> dict:
  """Recovers Llama 3 rope_scaling from the per-frequency divisors llama.cpp stores.

  convert_hf_to_gguf.py writes one divisor per rotary frequency: 1 for short wavelengths,
  `factor` for long ones and a smooth blend between. The largest is `factor`; the other
  constants are Llama 3's standard ones, checked by recomputing every divisor.
  """
  scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_ROPE}
  freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim)  # [head_dim // 2]
  wavelen = 2 * math.pi / freqs
  old_len = scaling["original_max_position_embeddings"]
  low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
  smooth = (old_len / wavelen - low) / (high - low)
  expected = np.where(wavelen < old_len / high, 1.0,
                      np.where(wavelen > old_len / low, factor,
                               1 / ((1 - smooth) / factor + smooth)))
  if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
    raise ModelLoadError(
        f"GGUF file {str(path)!r} has a rope_freqs tensor that is not Llama 3 RoPE scaling with "
        f"{_LLAMA3_ROPE}; other rope_freqs are not supported."
    )
  return scaling


def _dequantize(tensor, path) -> np.ndarray:
  """A GGUF tensor as float32 numpy in numpy (PyTorch) order: [out, in]."""
  try:
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except NotImplementedError:
    raise ModelLoadError(
        f"GGUF file {str(path)!r}: tensor {tensor.name!r} has quantization "
        f"{tensor.tensor_type.name}, which the installed gguf package cannot dequantize."
    ) from None
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
  return np.array(weights, dtype=np.float32).reshape(shape)  # copy: off the memmap


def _unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row permutation (per head: interleaved halves -> rotate-half)."""
  rows = weights.shape[0]
  # llama.cpp did reshape(heads, 2, half, ...).swapaxes(1, 2); swap back.
  per_head = weights.reshape(num_heads, rows // num_heads // 2, 2, *weights.shape[1:])
  return per_head.swapaxes(1, 2).reshape(weights.shape)


def _hf_name(name: str, path) -> str:
  stem, _, suffix = name.rpartition(".")
  if stem in _GLOBAL_TENSORS:
    return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
  match = _BLOCK_NAME.fullmatch(name)
  if match and match.group(2) in _BLOCK_TENSORS:
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{suffix}"
  raise ModelLoadError(
      f"GGUF file {str(path)!r} has tensor {name!r}, which has no Hugging Face Llama name; known:"
      f" {sorted(_GLOBAL_TENSORS)} and blk.N.{{{', '.join(_BLOCK_TENSORS)}}}."
  )
