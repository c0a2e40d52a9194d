"""Llama-family decoder in Flax NNX: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v bias), SmolLM2.

Usage::

    model = Llama(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    logits, cache = model(tokens, positions, cache)

``tokens [B, T]`` int32; ``positions [B, T]`` int32 absolute positions (``-1`` = padding; a
ragged batch is right-padded), default ``arange(T)``. ``cache=None`` runs plain causal
attention; otherwise any object with the cache contract
``cache.attend(layer, q, k, v, positions, rope) -> (out, cache)`` (the dense cache or a
compressed ``headkv_jax`` cache) sees each layer's pre-RoPE projections. Layers are unrolled in
Python: on CPU that decoded faster than ``scan`` with per-layer donated cache buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from headkv_jax import attention
from models.config import LlamaConfig


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _rows(dot, flat):
  """``dot(flat [N, H])``, given two rows where ``N == 1`` in bfloat16: XLA:CPU's one-row
  bfloat16 dot is slow (SmolLM2's tied head: 36.6 ms for one row, 3.5 ms for two)."""
  if flat.shape[0] == 1 and flat.dtype == jnp.bfloat16:
    return dot(jnp.concatenate([flat, jnp.zeros_like(flat)]))[:1]
  return dot(flat)


class Linear(nnx.Linear):
  """``nnx.Linear`` computed as one 2-D matmul over the flattened leading axes.

  XLA:CPU runs a ``[B, T, H] x [H, O]`` dot slower than the same dot on ``[B * T, H]``: at
  2,048 tokens SmolLM2's MLP took 67 ms per layer as rank-3 dots and 55 ms as rank-2 ones
  (2 CPU cores, float32). Same parameters and results as ``nnx.Linear``.
  """

  def __call__(self, x):
    lead = x.shape[:-1]
    return _rows(super().__call__, x.reshape(-1, x.shape[-1])).reshape(lead + (-1,))


def _linear(din, dout, dtype, rngs, bias=False):
  return Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class Attention(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    h, d = cfg.hidden_size, cfg.head_dim
    self.q_proj = _linear(h, cfg.num_heads * d, dtype, rngs, cfg.attention_bias)
    self.k_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs, cfg.attention_bias)
    self.v_proj = _linear(h, cfg.num_kv_heads * d, dtype, rngs, cfg.attention_bias)
    self.o_proj = _linear(cfg.num_heads * d, h, dtype, rngs)

  def __call__(self, x, positions, rope, layer: int, cache):
    b, t, _ = x.shape
    cfg = self.cfg
    q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, Hq, D]
    k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, Hkv, D]
    v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, Hkv, D]
    if cache is None:
      out = attention.self_attention(q, k, v, positions, rope)
    else:
      out, cache = cache.attend(layer, q, k, v, positions, rope)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim).astype(x.dtype)
    return self.o_proj(out), cache


class MLP(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)
    self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, dtype, rngs)

  def __call__(self, x):
    flat = x.reshape(-1, x.shape[-1])  # [B * T, H]: see Linear
    out = self.down_proj(jax.nn.silu(self.gate_proj(flat)) * self.up_proj(flat))
    return out.reshape(x.shape)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: LlamaConfig, dtype, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.self_attn = Attention(cfg, dtype, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, positions, rope, layer, cache):
    h, cache = self.self_attn(self.input_layernorm(x), positions, rope, layer, cache)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
  """Decoder-only Llama-style language model (see the module docstring)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.dtype = dtype
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
    if not config.tie_word_embeddings:
      self.lm_head = _linear(config.hidden_size, config.vocab_size, dtype, rngs)

  def embed(self, tokens):
    """``tokens [B, T]`` (padding may be any value) -> embeddings ``[B, T, H]``."""
    return self.embed_tokens(jnp.maximum(tokens, 0))

  def hidden_states(self, tokens, positions=None, cache=None):
    """Final normed hidden states ``[B, T, H]`` and the updated cache."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    rope = self.config.make_rope()
    x = self.embed(tokens)  # [B, T, H]
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, positions, rope, i, cache)
    return self.norm(x), cache

  def logits_from_hidden(self, x):
    """``[..., H]`` -> float32 logits ``[..., vocab]``."""
    if self.config.tie_word_embeddings:
      w = self.embed_tokens.embedding[...]  # [V, H]
      flat = x.reshape(-1, x.shape[-1])  # a rank-2 dot, as in Linear
      logits = _rows(lambda f: jnp.einsum("nh,vh->nv", f, w,
                                          preferred_element_type=jnp.float32), flat)
      return logits.reshape(x.shape[:-1] + (-1,))
    return self.lm_head(x).astype(jnp.float32)

  def __call__(self, tokens, positions=None, cache=None, *, last_only: bool = False):
    """``tokens [B, T]`` -> ``(logits [B, T, V] or [B, V] if last_only, cache)``.

    ``last_only`` keeps the logits of each row's last real token (positions >= 0), which is
    all generation needs and saves a ``[B, T, vocab]`` array on long prompts.
    """
    x, cache = self.hidden_states(tokens, positions, cache)
    return self.head(x, positions, last_only=last_only), cache

  def head(self, x, positions=None, *, last_only: bool = False):
    """Normed hidden states ``[B, T, H]`` -> logits (of each row's last real token if
    ``last_only``; ``positions`` None means every token is real)."""
    if last_only:
      b, t = x.shape[:2]
      if positions is None:
        last = jnp.full((b,), t - 1)
      else:
        last = jnp.maximum(jnp.sum(positions >= 0, axis=1) - 1, 0)
      # A per-row gather (not x[arange(b), last]) so a batch split over devices stays split.
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, H]
    return self.logits_from_hidden(x)
