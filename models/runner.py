"""Jitted entry points for a model: the boundary where NNX modules meet ``jax.jit``.

The NNX model is split once into a static graph and a parameter pytree; every step is a pure
jitted function of (params, tokens, positions, cache). The cache argument is donated, so its
buffers are updated in place on every backend that supports donation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

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

    @functools.partial(jax.jit, static_argnames=("last_only",), donate_argnames=("cache",))
    def forward(params, tokens, positions, cache, last_only):
      model = nnx.merge(graphdef, params)
      return model(tokens, positions, cache, last_only=last_only)

    return forward

  def forward(self, tokens, positions=None, cache=None, *, last_only=False):
    """Jitted ``model(tokens, positions, cache)``; ``cache`` is donated (do not reuse it)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
      b, t = tokens.shape
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self._forward(self.params, tokens, jnp.asarray(positions, jnp.int32), cache,
                         last_only)
