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

On a device mesh (``ModelRunner(model, mesh="data:2,model:4")``, or the ``--mesh`` flag's
default) the parameters are placed once by :mod:`headkv_jax.sharding`'s layout; every call
places its tokens, cache or decode state the same way (a no-op for arrays already there) and
every program pins what it returns to that sharding, so a donated cache comes back in the
sharding it went in with: one compiled program per mesh and shape, no resharding between
steps.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from headkv_jax import sharding
from headkv_jax.jit import jit
from models import layerwise
from models.config import LlamaConfig


class ModelRunner:
  """Holds a model's split state and its compiled forward functions.

  Args:
    model: the NNX model (its parameters are moved onto the mesh in place).
    mesh: a ``jax.sharding.Mesh`` with axes ``(data, model)``, mesh text
      (``"data:2,model:4"``), ``""`` for one device, or None for
      ``headkv_jax.sharding.default_mesh()`` (what ``--mesh`` set; one device by default).
  """

  def __init__(self, model, mesh=None):
    self.model = model
    self.config: LlamaConfig = model.config
    self.mesh = sharding.make_mesh(sharding.default_mesh() if mesh is None else mesh)
    self.layout = None if self.mesh is None else sharding.layout_for(self.mesh, self.config)
    self.graphdef, self.params = nnx.split(model)
    if self.layout is not None:
      self.params = sharding.shard_params(self.params, self.layout)
      nnx.update(model, self.params)  # the model holds the placed arrays, not a second copy

  @property
  def mesh_text(self) -> str:
    """``"data:2,model:1"``, or ``""`` on one device (for records)."""
    return sharding.mesh_text(self.mesh)

  def place(self, tree, batch: int):
    """``tree`` (tokens, a cache, a decode state) placed on the mesh for batch ``batch``
    (unchanged without a mesh); MeshError if the data axis does not divide the batch."""
    if self.layout is None:
      return tree
    sharding.check_batch(self.layout, batch)
    return sharding.shard_tree(tree, self.layout, batch)

  def _pin(self, tree, batch: int):
    """Inside a jitted function: ``tree`` constrained to the layout (identity without a mesh)."""
    if self.layout is None:
      return tree
    return sharding.constrain(tree, self.layout, batch)

  @functools.cached_property
  def _forward(self):
    graphdef = self.graphdef

    @jit(static_argnames=("last_only",), donate_argnames=("cache",))
    def forward(params, tokens, positions, cache, last_only):
      model = nnx.merge(graphdef, params)
      out = model(tokens, positions, cache, last_only=last_only)
      return self._pin(out, tokens.shape[0])

    return forward

  @functools.cached_property
  def _layerwise(self):
    return layerwise.LayerwiseForward(self.model, self.graphdef, self.params, pin=self._pin)

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
    tokens, positions, cache = self.place((tokens, positions, cache), b)
    with sharding.tracing(self.layout):  # a program traced by this call sees the layout
      if t > 1 and layerwise.supports(cache):
        return self._layerwise(tokens, positions, cache, last_only=last_only)
      return self._forward(self.params, tokens, positions, cache, last_only)

  def decode_block(self, loop, state, *operands):
    """``loop(step, state, *operands)`` as one jitted program; ``state`` is donated.

    ``step(tokens [B], positions [B], cache) -> (logits [B, V], cache)`` is the model's
    one-token forward, traced inside ``loop`` (e.g. in a ``lax.while_loop`` body). ``loop`` is
    static: hashable, and equal loops share one compiled program per operand shapes.
    """
    if self.layout is not None:
      state, operands = self.place((state, operands), sharding.batch_size(state))
    with sharding.tracing(self.layout):
      return self._decode_block(self.params, loop, state, *operands)

  def lower_decode_block(self, loop, state, *operands):
    """The decode block :meth:`decode_block` would run, lowered (``.compile().as_text()`` is
    its HLO; ``.compile().input_shardings`` / ``output_shardings`` its placement). ``state``
    and ``operands`` may be ``jax.ShapeDtypeStruct`` trees."""
    if self.layout is not None:
      state, operands = self.place((state, operands), sharding.batch_size(state))
    with sharding.tracing(self.layout):
      return self._decode_block.lower(self.params, loop, state, *operands)

  @functools.cached_property
  def _decode_block(self):
    graphdef = self.graphdef

    @jit(static_argnums=1, donate_argnums=2)
    def decode_block(params, loop, state, *operands):
      batch = None if self.layout is None else sharding.batch_size(state)

      def step(tokens, positions, cache):
        model = nnx.merge(graphdef, params)
        cache = self._pin(cache, batch)  # the loop carries the cache in the layout's sharding
        out = model(tokens[:, None], positions[:, None], cache, last_only=True)
        return self._pin(out, batch)

      return self._pin(loop(step, state, *operands), batch)

    return decode_block
