"""Model configuration for the Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from headkv_jax import rope as rope_lib
from models.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a Llama-style decoder.

  Attributes:
    vocab_size: number of token embeddings.
    hidden_size: residual stream width.
    intermediate_size: SwiGLU inner width.
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA: ``num_heads`` is a multiple of it).
    head_dim: width of one head.
    rope_theta: RoPE base.
    rope_scaling: Hugging Face ``rope_scaling`` dict or None.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head reuses the embedding matrix.
    attention_bias: q/k/v projections have a bias (Qwen2).
    max_position_embeddings: the trained context length.
    bos_token_id / eos_token_ids: special tokens (several EOS ids are allowed).
    model_type: "llama", "mistral" or "qwen2".
    model_id: a name for profiles and results (a path or an alias).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 2048
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  model_type: str = "llama"
  model_id: str = ""

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"Unsupported model_type {self.model_type!r}; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}."
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          "Number of query heads must be divisible by number of KV heads. "
          f"Got {self.num_heads} and {self.num_kv_heads}."
      )
    rope_lib.rope_type_of(self.rope_scaling)  # raises on unsupported rope types

  def past_context(self, num_tokens: int) -> bool:
    """Whether a sequence of `num_tokens` (prompt + new tokens) passes the trained context."""
    return num_tokens > self.max_position_embeddings

  @property
  def group_size(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def rope_inv_freq(self) -> np.ndarray:
    """``[head_dim // 2]`` float32 RoPE inverse frequencies, on the host."""
    return rope_lib.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

  def make_rope(self) -> rope_lib.RoPE:
    import jax.numpy as jnp  # local: keep config import light

    return rope_lib.RoPE(inv_freq=jnp.asarray(self.rope_inv_freq()))

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], model_id: str = "") -> "LlamaConfig":
    """Builds a config from a Hugging Face ``config.json`` dict, validating what we support.

    Raises:
      ModelLoadError (a ValueError): an unsupported architecture or feature, or a missing key;
        the message names ``model_id``.
    """
    try:
      return cls._from_hf(hf, model_id)
    except (KeyError, TypeError, ValueError) as e:  # a missing key, a bad value, a rope type
      what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
      raise ModelLoadError(f"config of model {model_id!r}: {what}") from None

  @classmethod
  def _from_hf(cls, hf: Mapping[str, Any], model_id: str) -> "LlamaConfig":
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelLoadError(
          f"Unsupported architecture model_type={model_type!r} "
          f"(architectures={hf.get('architectures')}); supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}."
      )
    if hf.get("hidden_act", "silu") != "silu":
      raise ModelLoadError(f"Unsupported hidden_act {hf['hidden_act']!r}; supported: 'silu'.")
    sliding = hf.get("sliding_window")
    if model_type == "mistral" and sliding is not None:
      max_pos = int(hf.get("max_position_embeddings", 0))
      if sliding < max_pos:
        raise ModelLoadError(
            f"Mistral sliding_window={sliding} (< max_position_embeddings={max_pos}) is not "
            "supported; only full attention (sliding_window: null) is."
        )
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
      raise ModelLoadError("Qwen2 use_sliding_window=True is not supported.")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    rope_scaling = hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters")  # transformers >= 5 spelling
    if rope_params:
      rope_theta = rope_params.get("rope_theta", rope_theta)
      if rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    if model_type == "qwen2":
      attention_bias = True
    else:
      attention_bias = bool(hf.get("attention_bias", False))
    return cls(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_heads),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=dict(rope_scaling) if rope_scaling else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        model_type=model_type,
        model_id=model_id,
    )
