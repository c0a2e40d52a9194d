"""Jitted entry points for a model: the boundary where NNX modules meet ``jax.jit``.

The NNX model is split once into a static graph and a parameter pytree; every step is a pure
jitted function of (params, tokens, positions, cache). A call over several tokens (a prefill
chunk) runs layer by layer (:mod:`models.layerwise`: one compiled program per distinct layer
shape instead of every layer compiled again); a one-token call is one program.
:meth:`ModelRunner.decode_block` runs a
caller's loop over one-token steps (``models.generation``'s block of decode steps) as one
jitted program with the model traced inside. The cache argument is donated, so its
buffers are updated in place on every backend that supports donation (``headkv_jax.jit``
adds the compiler option that makes XLA:CPU honour it without copies).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from headkv_jax.jit import jit
from models import layerwise
from models.config import LlamaConfig


class ModelRunner:
  """Holds a model's split state and its compiled forward functions."""

  def __init__(self, model):
    self.model = model
    self.config: LlamaConfig = model.config
    self.graphdef, self.params = nnx.split(model)

  @functools.cached_property
  def _forward(self):
    graphdef = self.graphdef

    @jit(static_argnames=("last_only",), donate_argnames=("cache",))
    def forward(params, tokens, positions, cache, last_only):
      model = nnx.merge(graphdef, params)
      return model(tokens, positions, cache, last_only=last_only)

    return forward

  @functools.cached_property
  def _layerwise(self):
    return layerwise.LayerwiseForward(self.model, self.graphdef, self.params)

  def forward(self, tokens, positions=None, cache=None, *, last_only=False):
    """Jitted ``model(tokens, positions, cache)``; ``cache`` is donated (do not reuse it).

    Several tokens with a cache that hands out layer views (or none) run layer by layer; the
    result is bit-identical to the whole-model program (``tests/test_layerwise.py``).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    positions = jnp.asarray(positions, jnp.int32)
    if t > 1 and layerwise.supports(cache):
      return self._layerwise(tokens, positions, cache, last_only=last_only)
    return self._forward(self.params, tokens, positions, cache, last_only)

  def decode_block(self, loop, state, *operands):
    """``loop(step, state, *operands)`` as one jitted program; ``state`` is donated.

    ``step(tokens [B], positions [B], cache) -> (logits [B, V], cache)`` is the model's
    one-token forward, traced inside ``loop`` (e.g. in a ``lax.while_loop`` body). ``loop`` is
    static: hashable, and equal loops share one compiled program per operand shapes.
    """
    return self._decode_block(self.params, loop, state, *operands)

  @functools.cached_property
  def _decode_block(self):
    graphdef = self.graphdef

    @jit(static_argnums=1, donate_argnums=2)
    def decode_block(params, loop, state, *operands):
      def step(tokens, positions, cache):
        model = nnx.merge(graphdef, params)
        return model(tokens[:, None], positions[:, None], cache, last_only=True)

      return loop(step, state, *operands)

    return decode_block
