"""Device meshes for the model and its caches: which axis of which array lives where.

A mesh has two named axes, ``data`` and ``model`` (``--mesh=data:2,model:4``; an axis left
out has size 1; no mesh = one device, exactly the unsharded programs)::

    mesh = make_mesh("data:2,model:4")               # 8 devices, [2, 4]
    runner = ModelRunner(model, mesh=mesh)           # params placed by the layout below
    out = generation.generate(runner, prompts, 16)   # caches placed on the mesh as they arrive

Everything is GSPMD: arrays carry a ``NamedSharding``, the jitted programs are the same
programs as on one device, and XLA inserts the collectives. The layout (:class:`Layout`,
chosen per model and mesh by :func:`layout_for`) is

  ============================  ==========================================================
  array                         sharding
  ============================  ==========================================================
  q/k/v projections [H, h*D]    columns over ``model`` when ``model`` divides the KV heads
  o_proj [Hq*D, H]              rows over ``model`` (same condition); all-reduce after it
  gate/up [H, I], down [I, H]   columns / rows over ``model`` when it divides ``I``;
                                all-reduce after ``down``
  embedding, lm_head, norms     replicated
  activations, logits           batch over ``data``
  dense cache k, v [B,Hkv,C,D]  batch over ``data``; KV heads over ``model`` when the
                                attention is head-sharded, else replicated over ``model``
  recorded statistics           as the dense cache (KV heads on axis 1)
  paged caches (every array)    batch over ``data``; replicated over ``model``
  anything else with a batch    batch over ``data`` (a PRNG ``key`` stays replicated)
  ============================  ==========================================================

Why this layout stays balanced:

- **KV heads that do not divide are replicated, not split unevenly** (what vLLM-TPU does when
  the tensor-parallel degree exceeds the KV heads; MaxText refuses such meshes). SmolLM2-135M
  has 3 KV heads: on ``model:2`` or ``model:4`` every device keeps all of the attention and
  its cache and computes it redundantly, and the MLP (1536 = 2^9 * 3) is split. A query
  head's group must sit with its KV head, so the query heads follow the KV heads' condition.
- **Paged caches are replicated over** ``model``. Their pools ``[B, S, D]`` lay the heads'
  regions end to end with *per-head* budgets (head-aware budgets differ by 10x between
  heads), so cutting ``S`` into equal pieces would cut through regions, and cutting at region
  boundaries would leave the devices lopsided; eviction gathers and scatters along ``S``,
  which on a split pool would all-gather the cache every step. Replicated over ``model`` the
  pools stay whole on every device, with the same bytes on each. When the attention is
  head-split, the paged cache gathers the new token's q/k/v (token-sized) and attends whole
  (:func:`replicate_over_model`), instead of XLA attending per head and all-gathering the
  per-slot scores ``[B, S]`` every step.
- Batch rows are independent, so ``data`` splits every cache evenly; per-row writes are
  mapped over rows (``slot_pool.scatter``) so each stays on the devices holding its row.

What remains inside a decode step (``tests/test_sharding.py`` reads the compiled HLO; the loop
holds the cache in one sharding from step to step and moves none of it):

- the all-reduce after the row-parallel matmuls over ``model`` (o_proj when heads are split,
  down_proj when the MLP is): activation-sized ``[B/data, 1, H]``, two per layer;
- with heads split and a paged cache, all-gathers of the new token's q, k, v ``[B, 1, h*D]``;
- the dense cache's per-row append (one ``dynamic_update_slice`` per row, kept because it
  updates the donated buffer in place) moves each row's new K/V ``[1, Hkv, 1, D]`` and length
  to the devices that hold the row (collective-permutes, token-sized);
- scalar all-reduces of the loop's and the eviction's predicates over ``data`` (all rows
  done? any head over budget?).

Replication is the documented cost: :func:`replicas` says how many devices hold each byte,
and :func:`device_bytes` what each device holds; summed over devices they give
``sum(leaf bytes * replicas)``, the single-device figure when nothing is replicated.

A mesh it cannot serve is a :class:`MeshError` naming the mesh and what is allowed: bad flag
text, an axis other than ``data``/``model``, more devices than exist, a ``model`` axis that
divides neither the KV heads nor the MLP width, a ``data`` axis that does not divide the
batch. Several processes (``jax.distributed``, :func:`initialize_distributed`) see one mesh
over all their devices; the host loop of ``models.generation`` reads every row's tokens, so
each process must hold the whole batch: across processes the devices are laid data-minor
(every process spans the data axis) and the processes split ``model``. BUILD.md has the
launch commands for GPU hosts and TPU pods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "model")
_TEXT = re.compile(r"^\s*([A-Za-z_]\w*)\s*:\s*(\d+)\s*$")
# Parameter names of a Llama-style decoder and how they are split over ``model``.
_COLUMN_HEADS = ("q_proj", "k_proj", "v_proj")  # [H, heads * D] and their biases [heads * D]
_ROW_HEADS = ("o_proj",)  # [Hq * D, H]
_COLUMN_MLP = ("gate_proj", "up_proj")  # [H, I]
_ROW_MLP = ("down_proj",)  # [I, H]

_default_mesh: Mesh | None = None
_tracing: list["Layout"] = []  # the layout of the program being traced (ModelRunner sets it)


class MeshError(ValueError):
  """A mesh that cannot be built or cannot serve a model or batch (the message says why)."""


def parse_mesh(text: str | None) -> dict[str, int]:
  """``"data:2,model:4"`` -> ``{"data": 2, "model": 4}``; ``""`` / None -> ``{}`` (one device)."""
  if text is None or not str(text).strip():
    return {}
  out: dict[str, int] = {}
  for part in str(text).split(","):
    match = _TEXT.match(part)
    if not match:
      raise MeshError(f"Bad mesh {text!r}: {part.strip()!r} is not 'axis:size'. Write e.g. "
                      "'data:2', 'model:4' or 'data:2,model:4' (axes: data, model).")
    name, size = match.group(1), int(match.group(2))
    if name not in AXES:
      raise MeshError(f"Bad mesh {text!r}: unknown axis {name!r}; allowed axes: "
                      f"{', '.join(AXES)}.")
    if name in out:
      raise MeshError(f"Bad mesh {text!r}: axis {name!r} is given twice.")
    if size < 1:
      raise MeshError(f"Bad mesh {text!r}: axis {name!r} has size {size}; sizes are >= 1.")
    out[name] = size
  return out


def mesh_text(mesh: Mesh | None) -> str:
  """``"data:2,model:4"`` of a mesh; ``""`` for None (one device)."""
  if mesh is None:
    return ""
  return ",".join(f"{a}:{mesh.shape[a]}" for a in AXES)


def make_mesh(spec: str | Mapping[str, int] | Mesh | None, devices=None) -> Mesh | None:
  """A ``(data, model)`` mesh over the first ``data * model`` of ``devices`` (default: every
  device of every process, ``jax.devices()``); None for an empty spec (one device)."""
  if spec is None or isinstance(spec, Mesh):
    if spec is not None:
      _check_axes(spec)
    return spec
  sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
  if not sizes:
    return None
  text = ",".join(f"{a}:{sizes[a]}" for a in AXES if a in sizes)
  for a in sizes:
    if a not in AXES:
      raise MeshError(f"Bad mesh {text!r}: unknown axis {a!r}; allowed axes: {', '.join(AXES)}.")
  shape = tuple(int(sizes.get(a, 1)) for a in AXES)  # [data, model]
  devices = jax.devices() if devices is None else list(devices)
  n = math.prod(shape)
  if n > len(devices):
    platform = devices[0].platform if devices else "?"
    hint = (" On CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{n} before JAX starts." if platform == "cpu" else "")
    raise MeshError(f"Mesh {text} needs {n} devices; {len(devices)} {platform} device(s) "
                    f"exist (data * model must be <= {len(devices)}).{hint}")
  chosen = np.asarray(devices[:n], dtype=object)
  if len({d.process_index for d in chosen}) > 1:
    # Devices come process by process; data-minor order spreads every process over the whole
    # data axis, so each process holds every batch row (the host reads whole-batch tokens).
    grid = chosen.reshape(shape[::-1]).T  # [data, model]
    for p in sorted({d.process_index for d in chosen}):
      rows = {i for i, row in enumerate(grid) for d in row if d.process_index == p}
      if len(rows) < shape[0]:
        raise MeshError(
            f"Mesh {text} over {len({d.process_index for d in chosen})} processes: process "
            f"{p} holds batch rows of only {len(rows)} of the data:{shape[0]} shards; every "
            "process must hold the whole batch (the host loop reads every row's tokens), so "
            "put the processes on the model axis (e.g. data:1,model:<devices>).")
  else:
    grid = chosen.reshape(shape)  # [data, model]: a model group is neighbouring devices
  return Mesh(grid, AXES)


def _check_axes(mesh: Mesh) -> None:
  if tuple(mesh.axis_names) != AXES:
    raise MeshError(f"A mesh needs the axes {AXES}; got {tuple(mesh.axis_names)}.")


def set_default_mesh(mesh: Mesh | None) -> None:
  """The mesh a ``ModelRunner`` built without one uses (the ``--mesh`` flag sets it)."""
  global _default_mesh
  _default_mesh = mesh if mesh is None else make_mesh(mesh)


def default_mesh() -> Mesh | None:
  return _default_mesh


# ---- the layout ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a mesh splits of one model (see the module docstring).

  Attributes:
    mesh: the ``(data, model)`` mesh.
    num_kv_heads: the model's KV heads (cache arrays with this axis 1 may be head-sharded).
    shard_heads: attention (q/k/v/o and the dense cache's KV heads) split over ``model``.
    shard_mlp: the MLP's hidden dimension split over ``model``.
  """

  mesh: Mesh
  num_kv_heads: int
  shard_heads: bool
  shard_mlp: bool

  @property
  def data(self) -> int:
    return self.mesh.shape["data"]

  @property
  def model(self) -> int:
    return self.mesh.shape["model"]

  def describe(self) -> str:
    """One line for logs and records, e.g. ``data:2,model:4 (heads replicated, mlp split)``."""
    heads = "split" if self.shard_heads else "replicated"
    mlp = "split" if self.shard_mlp else "replicated"
    return f"{mesh_text(self.mesh)} (heads {heads}, mlp {mlp})"


def layout_for(mesh: Mesh, config) -> Layout:
  """The layout of a model of ``config`` (a ``LlamaConfig``) on ``mesh``.

  Raises MeshError for a ``model`` axis that would split nothing (it divides neither the KV
  heads nor the MLP width): every device would only repeat the others' work.
  """
  _check_axes(mesh)
  m = mesh.shape["model"]
  heads = config.num_kv_heads % m == 0 and config.num_heads % m == 0
  mlp = config.intermediate_size % m == 0
  if m > 1 and not (heads or mlp):
    raise MeshError(
        f"Mesh {mesh_text(mesh)}: model:{m} divides neither the {config.num_kv_heads} KV heads "
        f"nor the MLP width {config.intermediate_size}, so it would split nothing; use a "
        f"model axis that divides {config.num_kv_heads} or {config.intermediate_size}.")
  return Layout(mesh, config.num_kv_heads, heads and m > 1, mlp and m > 1)


def check_batch(layout: Layout, batch: int) -> None:
  """MeshError unless the ``data`` axis divides ``batch`` (rows are split evenly, not padded)."""
  if batch % layout.data:
    raise MeshError(f"Mesh {mesh_text(layout.mesh)} splits the batch over data:{layout.data}, "
                    f"which does not divide the batch of {batch}; use a batch that is a "
                    f"multiple of {layout.data} or a data axis dividing {batch}.")


def _names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return out


def param_spec(path, shape, layout: Layout) -> P:
  """The partition spec of one parameter, from its path in the NNX state and its shape."""
  names = _names(path)
  owner = next((n for n in reversed(names) if n.endswith("_proj")), None)
  kind = names[-2] if names and names[-1] == "value" and len(names) > 1 else names[-1]
  if owner is None or len(shape) not in (1, 2):
    return P()
  heads = layout.shard_heads and owner in _COLUMN_HEADS + _ROW_HEADS
  mlp = layout.shard_mlp and owner in _COLUMN_MLP + _ROW_MLP
  if not (heads or mlp):
    return P()
  column = owner in _COLUMN_HEADS + _COLUMN_MLP
  if kind == "bias":  # [out]: a column-parallel bias splits with its columns
    return P("model") if column else P()
  return P(None, "model") if column else P("model", None)


def param_shardings(params, layout: Layout):
  """``NamedSharding`` of every leaf of a model's parameter state."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(layout.mesh, param_spec(path, x.shape, layout)), params)


def shard_params(params, layout: Layout):
  """``params`` placed on the mesh by :func:`param_shardings`."""
  return _put(params, param_shardings(params, layout))


def _dense_like(names: list[str]) -> bool:
  """Whether a leaf at this path is a dense cache's ``k``/``v`` or a recorded statistic:
  ``[B, Hkv, ...]`` arrays that split over KV heads with the attention."""
  if len(names) >= 3 and names[-1] in ("k", "v") and names[-3] == "layers":
    return names[-2].isdigit()  # …/layers/<i>/k (a paged store is …/k/<class>, and paged)
  return len(names) >= 2 and names[-2] in ("accumulated", "window_probs", "novelty")


def array_spec(path, shape, layout: Layout, batch: int, paged: bool) -> P:
  """The partition spec of a cache (or decode state, or operand) leaf of batch ``batch``."""
  if not shape or shape[0] != batch or _names(path)[-1:] == ["key"]:
    return P()
  axes = ["data"] + [None] * (len(shape) - 1)
  if (not paged and layout.shard_heads and len(shape) >= 3 and shape[1] == layout.num_kv_heads
      and _dense_like(_names(path))):
    axes[1] = "model"
  return P(*axes)


def _is_paged(node) -> bool:
  from headkv_jax.paged_cache import PagedKVCache  # pylint: disable=g-import-not-at-top
  return isinstance(node, PagedKVCache)


def tree_shardings(tree, layout: Layout, batch: int):
  """``NamedSharding`` of every array leaf of ``tree`` (caches, decode states, operands)."""

  def leaf(path, x, paged):
    return NamedSharding(layout.mesh, array_spec(path, np.shape(x), layout, batch, paged))

  def top(path, x):
    if _is_paged(x):  # a paged cache: every array by the batch rule alone
      return jax.tree_util.tree_map_with_path(lambda p, a: leaf(path + p, a, True), x)
    return leaf(path, x, False)

  return jax.tree_util.tree_map_with_path(top, tree, is_leaf=_is_paged)


def shard_tree(tree, layout: Layout, batch: int):
  """``tree`` placed by :func:`tree_shardings` (arrays already placed so are left as they are;
  ``jax.ShapeDtypeStruct`` leaves get the sharding, for lowering without data)."""
  return _put(tree, tree_shardings(tree, layout, batch))


def _put(tree, shardings):
  """``jax.device_put`` leaf by leaf, also across processes (each holds the whole value)."""

  def put(x, s):
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract (for lowering): the sharding it gets
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if isinstance(x, jax.Array) and x.sharding == s:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, s)  # a global array resharded
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    value = np.asarray(x)  # a process-local value: every process passes the same one
    return jax.make_array_from_callback(value.shape, s, lambda idx: value[idx])

  return jax.tree_util.tree_map(put, tree, shardings)


def constrain(tree, layout: Layout, batch: int):
  """``tree`` (inside a jitted function) pinned to :func:`tree_shardings`: the sharding a
  program returns is the one its next call takes, so a donated cache keeps its buffers."""
  return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, layout, batch))


def batch_size(tree) -> int:
  """The batch of a cache or a decode state: the leading axis of its per-row ``lengths``
  (every cache of the library keeps them: ``[B]`` dense, ``[B, Hkv]`` paged)."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _names(path)[-1:] == ["lengths"]:
      return int(np.shape(x)[0])
  raise ValueError("Cannot tell the batch of this tree: it holds no cache 'lengths'.")


@contextlib.contextmanager
def tracing(layout: Layout | None):
  """While a ``ModelRunner`` program of ``layout`` is traced (None: no mesh, nothing to do)."""
  if layout is None:
    yield
    return
  _tracing.append(layout)
  try:
    yield
  finally:
    _tracing.pop()


def replicate_over_model(*xs):
  """``xs`` (``[B, ...]`` activations, e.g. a layer's q, k, v) replicated over ``model``, batch
  over ``data``, inside a program traced under a head-splitting layout; unchanged otherwise.

  A paged cache calls it on the new tokens' q/k/v: its pools are replicated over ``model``,
  so its attention runs whole on every device, and gathering the token-sized q/k/v here is
  what keeps XLA from computing per-head pieces and all-gathering cache-sized results (the
  per-slot scores ``[B, S]``) every step.
  """
  layout = _tracing[-1] if _tracing else None
  if layout is None or not layout.shard_heads:
    return xs
  return tuple(jax.lax.with_sharding_constraint(
      x, NamedSharding(layout.mesh, P("data", *[None] * (x.ndim - 1)))) for x in xs)


# ---- bytes per device ----------------------------------------------------------------------


def replicas(x) -> int:
  """How many devices hold each element of the array ``x``."""
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return 1
  shards = {tuple((s.start, s.stop) for s in idx)
            for idx in sharding.devices_indices_map(np.shape(x)).values()}
  return len(sharding.device_set) // len(shards)


def device_bytes(tree) -> dict[int, int]:
  """Bytes of ``tree``'s arrays on each (addressable) device, by device id."""
  out: dict[int, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    if not isinstance(x, jax.Array):
      continue
    for shard in x.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def replicated_bytes(tree) -> int:
  """``sum(leaf bytes * replicas)``: what :func:`device_bytes` sums to over every device."""
  return sum(x.size * x.dtype.itemsize * replicas(x) for x in jax.tree_util.tree_leaves(tree)
             if isinstance(x, jax.Array))


# ---- several processes ---------------------------------------------------------------------


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """``jax.distributed.initialize`` when a multi-process run is asked for; returns whether it ran.

  Asked for = a coordinator address or more than one process, given here or in JAX's own
  environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``);
  ``coordinator_address="auto"`` leaves everything to JAX's cluster detection (TPU pods,
  SLURM, Open MPI, Kubernetes). Call it before anything starts a JAX backend. On CPU the
  cross-process collectives are gloo's.
  """
  import os  # pylint: disable=g-import-not-at-top

  def env_int(name):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None

  if coordinator_address == "auto":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()
    return True
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes if num_processes is not None else env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else env_int("JAX_PROCESS_ID")
  if not coordinator_address and (num_processes or 1) <= 1:
    return False
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise MeshError(f"process_id={process_id} is outside [0, num_processes={num_processes}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id)
  return True


__all__ = ["AXES", "Layout", "MeshError", "array_spec", "batch_size", "check_batch",
           "constrain", "default_mesh", "device_bytes", "initialize_distributed",
           "layout_for", "make_mesh", "mesh_text", "param_shardings", "param_spec",
           "parse_mesh", "replicas", "replicate_over_model", "replicated_bytes", "set_default_mesh",
           "shard_params", "shard_tree", "tracing", "tree_shardings"]
