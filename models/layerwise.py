"""Prefill one decoder layer per compiled program, so layers of the same shapes compile once.

One jitted program over the whole model unrolls every layer, and XLA compiles each copy: at
2,048 tokens the 30 layers of SmolLM2 took 25 s to compile against 6 s to run. A prefill
chunk is long enough that dispatching one program per layer costs nothing measurable, so
:class:`LayerwiseForward` runs ``embed -> layer 0 .. L-1 -> norm + head`` as separate
programs: every layer whose parameters and cache view have the same shapes reuses one
executable (all layers of the dense cache; the layers of a paged cache with equal budgets and
bits). Decoding (one token per step) stays one program: there the dispatches would cost, and
an unrolled step compiles fast.

A cache takes part in one of two ways:

* its ``attend`` takes a traced layer index (``cache.traced_layers``; the paged cache, whose
  layers all have the same shapes): every layer runs *one* program, ``attend(i, ...)`` with
  ``i`` an operand, the whole cache donated and updated in place;
* or it hands out one layer as a cache of its own (the dense and recording caches)::

    view = cache.layer_view(i)          # a one-layer cache: ``attend(0, ...)`` on layer i
    cache = cache.with_layer_view(i, view)   # puts the updated layer back

``cache=None`` (plain causal attention) works too.
"""

from __future__ import annotations

from flax import nnx
import jax.numpy as jnp

from headkv_jax.jit import jit


def supports(cache) -> bool:
  """Whether ``cache`` can be driven layer by layer (``None`` or a cache with layer views)."""
  return cache is None or getattr(cache, "traced_layers", False) or (
      hasattr(cache, "layer_view") and hasattr(cache, "with_layer_view"))


class LayerwiseForward:
  """``model(tokens, positions, cache)`` as one compiled program per distinct layer shape."""

  def __init__(self, model, graphdef, params, pin=None):
    """``pin(tree, batch)``, traced at the end of each program, fixes the sharding of what it
    returns (``ModelRunner`` on a mesh: the layout's; default: none)."""
    pin = pin or (lambda tree, batch: tree)
    self.config = model.config
    self.num_layers = len(model.layers)
    self._graphdef = graphdef
    self._params = params
    self._layer_params = [params["layers"][i] for i in range(self.num_layers)]
    layer_graphdef = nnx.graphdef(model.layers[0])
    config = self.config

    @jit
    def embed(params, tokens):
      return pin(nnx.merge(graphdef, params).embed(tokens), tokens.shape[0])  # [B, T, H]

    @jit
    def angles(positions):  # once per call, not in every layer (see RoPE.at)
      return config.make_rope().angles(positions)  # cos, sin [B, T, D/2]

    def make_rope(positions, angles):
      rope = config.make_rope()
      return rope if angles is None else rope.at(positions, angles)

    @jit(donate_argnames=("x", "cache"))
    def layer(layer_params, x, positions, angles, cache):
      block = nnx.merge(layer_graphdef, layer_params)
      return pin(block(x, positions, make_rope(positions, angles), 0, cache), x.shape[0])

    @jit(donate_argnames=("x", "cache"))
    def traced_layer(layer_params, x, positions, angles, cache, index):
      block = nnx.merge(layer_graphdef, layer_params)
      return pin(block(x, positions, make_rope(positions, angles), index, cache), x.shape[0])

    @jit(static_argnames=("last_only",))
    def head(params, x, positions, last_only):
      model = nnx.merge(graphdef, params)
      return pin(model.head(model.norm(x), positions, last_only=last_only), x.shape[0])

    self._embed, self._layer, self._head, self._angles = embed, layer, head, angles
    self._traced_layer = traced_layer

  def __call__(self, tokens, positions, cache, *, last_only: bool = False):
    """Same contract as the model call; ``cache`` is donated layer by layer."""
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.asarray(positions, jnp.int32)
    x = self._embed(self._params, tokens)  # [B, T, H]
    # A cache that rotates keys by their slot (position_mode="cache_relative") never rotates
    # by the positions: their angles are not computed (nor any position past the context).
    rolled = getattr(getattr(cache, "policy", None), "position_mode", None) == "cache_relative"
    angles = None if rolled else self._angles(positions)
    for i in range(self.num_layers):
      if cache is None:
        x, _ = self._layer(self._layer_params[i], x, positions, angles, None)
      elif getattr(cache, "traced_layers", False):
        x, cache = self._traced_layer(self._layer_params[i], x, positions, angles, cache,
                                      jnp.int32(i))
      else:
        x, view = self._layer(self._layer_params[i], x, positions, angles,
                              cache.layer_view(i))
        cache = cache.with_layer_view(i, view)
    return self._head(self._params, x, positions, last_only), cache


__all__ = ["LayerwiseForward", "supports"]
