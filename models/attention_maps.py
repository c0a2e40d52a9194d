"""Attention probabilities out of the model, without touching the model: a recording cache.

Head profiling (``experiments/profile_heads.py``) scores heads from their attention maps.
The model exposes attention only through the cache contract (see ``models/llama.py``)::

    out, cache = cache.attend(layer, q, k, v, positions, rope)

so :class:`AttentionRecorder` is a cache that stores nothing: ``attend`` runs the same causal
attention as ``cache=None`` (so the logits do not change) and also keeps the softmax
probabilities of the last ``num_rows`` query rows of every query head. A long probe's full
``T x T`` maps would not fit (30 layers x 9 heads x 1024^2 floats is 1 GB per sample), and the
head scores read only a few rows: the answer rows of a needle probe, the second copy of an
induction probe, a tail of rows for the local score.

  maps = attention_maps(model, tokens, num_rows=32)  # [layers, B, Hq, 32, T] float32
  maps, top1 = attention_maps(runner, tokens, 32, with_top1=True)  # + [B, 32] argmax ids

Row ``i`` of a map is the query at position ``T - num_rows + i``; that is the layout
``headkv_jax.head_scores`` expects (``attn[:, b]`` is its ``[layers, q_heads, T_query,
T_key]``). Inputs are one unpadded batch (every row ``T`` real tokens, positions
``arange(T)``).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from headkv_jax import attention


@flax.struct.dataclass
class AttentionRecorder:
  """A cache-contract object that records attention probabilities (a pytree).

  Attributes:
    maps: one ``[B, Hq, num_rows, T]`` float32 array per layer attended so far.
    num_rows: how many of the last query rows to record (static).
  """

  maps: tuple[jnp.ndarray, ...] = ()
  num_rows: int = flax.struct.field(pytree_node=False, default=1)

  def attend(self, layer: int, q, k, v, positions, rope):
    """Ordinary causal attention (as with ``cache=None``) plus the last rows' probabilities.

    Args:
      layer: must be the next layer (layers run in order).
      q: ``[B, T, Hq, D]`` pre-RoPE queries.
      k, v: ``[B, T, Hkv, D]`` pre-RoPE keys, values.
      positions: ``[B, T]`` int32 (``-1`` = padding, masked out as a key).
      rope: a ``headkv_jax.rope.RoPE``.
    """
    if layer != len(self.maps):
      raise ValueError(f'layers must be recorded in order: expected layer {len(self.maps)}, '
                       f'got {layer}.')
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if not 1 <= self.num_rows <= t:
      raise ValueError(f'num_rows must be in [1, {t}] (the tokens in this call). Got '
                       f'{self.num_rows}.')
    q = rope.apply(q, positions)
    k = rope.apply(k, positions)
    # The output: the very computation attention.self_attention does for cache=None.
    o, _, l = attention.causal_attention(q, k, v, positions)
    out = attention.unfold_outputs(attention.normalize(o, l), t).astype(v.dtype)

    rows = q[:, t - self.num_rows:]  # [B, R, Hq, D]
    k_per_q = jnp.repeat(k, hq // hkv, axis=2)  # [B, T, Hq, D]: q head h reads KV h // G
    logits = jnp.einsum('brhd,bshd->bhrs', rows * (d**-0.5), k_per_q,
                        preferred_element_type=jnp.float32)  # [B, Hq, R, T]
    mask = attention.position_mask(positions[:, t - self.num_rows:], positions)  # [B,1,R,T]
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    probs = jnp.where(mask, probs, 0.0)  # rows of padding queries: all zero, not NaN
    return out, self.replace(maps=self.maps + (probs,))

  def stacked(self) -> jnp.ndarray:
    """``[layers, B, Hq, num_rows, T]``."""
    return jnp.stack(self.maps)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_rows'))
def _record(graphdef, params, tokens, num_rows):
  model = nnx.merge(graphdef, params)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x, recorder = model.hidden_states(tokens, positions, AttentionRecorder(num_rows=num_rows))
  logits = model.logits_from_hidden(x[:, t - num_rows:])  # [B, R, V]
  return recorder.stacked(), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def attention_maps(runner_or_model, tokens, num_rows: int, *, with_top1: bool = False):
  """Attention probabilities of the last ``num_rows`` query rows, for every layer and head.

  Args:
    runner_or_model: a ``models.runner.ModelRunner`` or an NNX ``Llama``.
    tokens: ``[B, T]`` int token ids (no padding).
    num_rows: how many of the last query rows to keep (static: one compile per value).
    with_top1: also return the model's top-1 next-token id at those rows.

  Returns:
    ``maps [layers, B, Hq, num_rows, T]`` float32 numpy (row i is position
    ``T - num_rows + i``); with ``with_top1``, ``(maps, top1 [B, num_rows] int32)``.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f'tokens must be [B, T] with T >= 1. Got shape {tokens.shape}.')
  num_rows = int(num_rows)
  if not 1 <= num_rows <= tokens.shape[1]:
    raise ValueError(f'num_rows must be in [1, {tokens.shape[1]}] (the sequence length). '
                     f'Got {num_rows}.')
  if hasattr(runner_or_model, 'graphdef'):
    graphdef, params = runner_or_model.graphdef, runner_or_model.params
  else:
    graphdef, params = nnx.split(runner_or_model)
  maps, top1 = _record(graphdef, params, jnp.asarray(tokens, jnp.int32), num_rows)
  maps = np.asarray(maps)
  return (maps, np.asarray(top1)) if with_top1 else maps
