"""The fused quantized paged decode-attention kernel (interpret mode) against its references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from headkv_jax import quantization
from pallas_kernels import quantized_decode_attention as qda

B_S = qda.BlockSizes
_quantize_keys = jax.jit(quantization.quantize_keys, static_argnums=1)
_quantize_values = jax.jit(quantization.quantize_values, static_argnums=(1, 2))
_dequantize_keys = jax.jit(quantization.dequantize_keys, static_argnums=3)
_dequantize_values = jax.jit(quantization.dequantize_values, static_argnums=(3, 4))
_probs = jax.jit(qda.quantized_decode_probs, static_argnames=("k_bits", "key_axis"))
_reference = jax.jit(qda.quantized_decode_attention_reference,
                     static_argnames=("k_bits", "v_bits", "value_group", "key_axis"))


def _make_inputs(seed, *, batch, kv_heads, group, head_dim, page_size, max_pages, k_bits,
                 v_bits, value_group, lengths, spare_pages=3, poison=True,
                 key_axis="channel"):
  """Random pools (quantized with headkv_jax.quantization), page tables and lengths.

  Unused pages and the dead slots of partial pages are poisoned with NaN (their scales /
  zeros when the pool holds uint8 codes). ``key_axis="token"`` quantizes keys like values.
  """
  rng = np.random.default_rng(seed)
  lengths = np.asarray(lengths, np.int32).reshape(batch, kv_heads)
  used = [-(-int(n) // page_size) for n in lengths.ravel()]
  num_pages = sum(used) + spare_pages
  order = rng.permutation(num_pages)
  table = rng.choice([-1, 0, num_pages - 1], size=(batch * kv_heads, max_pages)).astype(np.int32)
  live_slots = np.zeros((num_pages, page_size), bool)
  at = 0
  for row, n_pages in enumerate(used):
    table[row, :n_pages] = order[at:at + n_pages]
    n = int(lengths.ravel()[row])
    for p in range(n_pages):
      live_slots[order[at + p], :max(0, min(page_size, n - p * page_size))] = True
    at += n_pages
  table = table.reshape(batch, kv_heads, max_pages)
  live_pages = live_slots.any(axis=1)

  # Keys with per-channel offsets (what per-channel key scales are for).
  k = rng.normal(size=(num_pages, page_size, head_dim)) + 2 * rng.normal(size=(1, 1, head_dim))
  v = rng.normal(size=(num_pages, page_size, head_dim))
  k, v = k.astype(np.float32), v.astype(np.float32)
  nan = np.float32(np.nan)

  def side(x, bits, quantize, scale_dead):
    if bits == 16:
      x = x.copy()
      if poison:
        x[~live_slots] = nan
      return jnp.asarray(x), None, None
    codes, scale, zero = quantize(jnp.asarray(x), bits)
    scale, zero = np.array(scale), np.array(zero)
    if poison:
      dead = scale_dead(live_slots, live_pages)
      scale[dead], zero[dead] = nan, nan
    return codes, jnp.asarray(scale), jnp.asarray(zero)

  if key_axis == "token":
    kp, ks, kz = side(k, k_bits, lambda x, b: _quantize_values(x, b, value_group),
                      lambda s, p: ~s)
  else:
    kp, ks, kz = side(k, k_bits, _quantize_keys, lambda s, p: ~p)
  vp, vs, vz = side(v, v_bits, lambda x, b: _quantize_values(x, b, value_group),
                    lambda s, p: ~s)
  q = jnp.asarray(rng.normal(size=(batch, kv_heads * group, head_dim)).astype(np.float32))
  args = (q, kp, ks, kz, vp, vs, vz, jnp.asarray(lengths), jnp.asarray(table))
  kw = dict(k_bits=k_bits, v_bits=v_bits, value_group=value_group)
  if key_axis != "channel":
    kw["key_axis"] = key_axis
  return args, kw


def _brute_force(args, kw, starts=None):
  """Softmax attention in float64 over K/V dequantized with headkv_jax.quantization
  (slots ``[starts, lengths)`` of each head)."""
  q, kp, ks, kz, vp, vs, vz, lengths, table = args
  batch, q_heads, head_dim = q.shape
  kv_heads = table.shape[1]
  page_size = kp.shape[1]
  t = np.clip(np.asarray(table), 0, kp.shape[0] - 1)
  if kw["k_bits"] == 16:
    k = np.asarray(kp, np.float64)[t]
  elif kw.get("key_axis") == "token":
    k = np.asarray(_dequantize_values(kp[t], ks[t], kz[t], kw["k_bits"], kw["value_group"]),
                   np.float64)
  else:
    k = np.asarray(_dequantize_keys(kp[t], ks[t], kz[t], kw["k_bits"]), np.float64)
  if kw["v_bits"] == 16:
    v = np.asarray(vp, np.float64)[t]
  else:
    v = np.asarray(_dequantize_values(vp[t], vs[t], vz[t], kw["v_bits"],
                                                  kw["value_group"]), np.float64)
  k = k.reshape(batch, kv_heads, -1, head_dim)
  v = v.reshape(batch, kv_heads, -1, head_dim)
  group = q_heads // kv_heads
  out = np.zeros((batch, q_heads, head_dim))
  lse = np.full((batch, q_heads), -np.inf)
  probs = np.zeros((batch, q_heads, k.shape[2]))
  for b in range(batch):
    for h in range(q_heads):
      n = int(lengths[b, h // group])
      n0 = 0 if starts is None else min(int(starts[b, h // group]), n)
      if n == n0:
        continue
      s = k[b, h // group, n0:n] @ np.asarray(q[b, h], np.float64) / math.sqrt(head_dim)
      lse[b, h] = np.log(np.exp(s - s.max()).sum()) + s.max()
      p = np.exp(s - lse[b, h])
      out[b, h] = p @ v[b, h // group, n0:n]
      probs[b, h, n0:n] = p
  return out, lse, probs


def _check(got, want, atol):
  out, lse = (np.asarray(x) for x in got)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out, want[0], atol=atol, rtol=atol)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(want[1]))
  fin = np.isfinite(want[1])
  np.testing.assert_allclose(lse[fin], want[1][fin], atol=atol, rtol=atol)


P = 16  # page size of most cases
# (seed, k_bits, v_bits, group, head_dim, page_size, max_pages, lengths, block sizes)
KERNEL_CASES = [
    (0, 16, 16, 1, 64, P, 4, [0, 1, P - 1, P, P + 1, 4 * P], B_S(2, 2)),
    (1, 8, 8, 3, 64, P, 5, [5 * P, 1, 0, P + 1], B_S(2, 2)),
    (2, 8, 4, 4, 128, P, 4, [P, 3 * P + 7], B_S(2, 1)),
    (3, 4, 4, 3, 128, P, 6, [6 * P, P - 1, 2, 33, 0, 70], B_S(2, 3)),
    (4, 4, 2, 1, 64, P, 3, [3 * P, P + 1, 1, P - 1], B_S(1, 3)),
    (5, 2, 2, 4, 128, P, 4, [4 * P, 0, P, 17], B_S(4, 1)),
    (6, 16, 4, 3, 64, 8, 6, [6 * 8, 3, 9, 0], B_S(2, 2)),
]


@pytest.mark.parametrize("seed,k_bits,v_bits,group,head_dim,page_size,max_pages,lengths,bs",
                         KERNEL_CASES)
def test_kernel_matches_reference(seed, k_bits, v_bits, group, head_dim, page_size, max_pages,
                                  lengths, bs):
  kv_heads = 2 if len(lengths) % 2 == 0 else 1
  batch = len(lengths) // kv_heads
  value_group = 32 if head_dim == 128 else 16
  args, kw = _make_inputs(seed, batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim,
                          page_size=page_size, max_pages=max_pages, k_bits=k_bits,
                          v_bits=v_bits, value_group=value_group, lengths=lengths)
  got = qda.quantized_decode_attention(*args, **kw, block_sizes=bs, interpret=True)
  want = _reference(*args, **kw)
  _check(got, [np.asarray(x) for x in want], atol=2e-5)
  empty = np.repeat(np.asarray(args[7]) == 0, group, axis=1)
  assert (np.asarray(got[0])[empty] == 0).all() and np.isneginf(np.asarray(got[1])[empty]).all()


# Per-token key scales (the paged cache's format): (seed, k_bits, v_bits, group, head_dim,
# value_group, lengths, starts or None, block sizes); interpret mode, so kept small.
TOKEN_KEY_CASES = [
    (50, 4, 4, 3, 32, 16, [3 * P, P + 1, 0, 5], None, B_S(1, 2)),
    (51, 2, 2, 2, 64, 32, [2 * P + 3, 7, P, 3 * P], [0, 2, P, P + 5], B_S(1, 2)),
    (52, 8, 2, 1, 32, 8, [3 * P, 2 * P, 5, P + 1], [P + 3, 2 * P, 0, 3], B_S(2, 1)),
    (53, 16, 4, 2, 32, 16, [3 * P, 9, 2, 0], [4, 9, 0, 0], B_S(1, 3)),
]


@pytest.mark.parametrize("seed,k_bits,v_bits,group,head_dim,value_group,lengths,starts,bs",
                         TOKEN_KEY_CASES)
def test_token_keys_and_starts(seed, k_bits, v_bits, group, head_dim, value_group, lengths,
                               starts, bs):
  """key_axis="token" (+ optional starts): kernel = reference = float64 brute force, NaN in
  every unused slot's scales; probabilities from the lse match too."""
  args, kw = _make_inputs(seed, batch=2, kv_heads=2, group=group, head_dim=head_dim,
                          page_size=P, max_pages=3, k_bits=k_bits, v_bits=v_bits,
                          value_group=value_group, lengths=lengths, key_axis="token")
  st = None if starts is None else jnp.asarray(np.reshape(starts, (2, 2)), jnp.int32)
  want = _brute_force(args, kw, None if st is None else np.asarray(st))
  got = qda.quantized_decode_attention(*args, **kw, block_sizes=bs, interpret=True, starts=st)
  _check(got, want, atol=2e-5)
  ref = _reference(*args, **kw, starts=st)
  _check(ref, want, atol=2e-5)
  q, kp, ks, kz, _, _, _, n, table = args
  probs = _probs(q, kp, ks, kz, n, table, ref[1], k_bits=k_bits, key_axis="token", starts=st)
  np.testing.assert_allclose(np.asarray(probs), want[2], atol=1e-5)


@pytest.mark.parametrize("k_bits,v_bits,group,head_dim", [(16, 16, 3, 64), (8, 4, 1, 128),
                                                          (4, 2, 4, 64)])
def test_reference_and_probs_match_brute_force(k_bits, v_bits, group, head_dim):
  args, kw = _make_inputs(10 + k_bits, batch=2, kv_heads=2, group=group, head_dim=head_dim,
                          page_size=P, max_pages=3, k_bits=k_bits, v_bits=v_bits,
                          value_group=32, lengths=[3 * P, 0, P + 1, 5])
  want = _brute_force(args, kw)
  out, lse = _reference(*args, **kw)
  _check((out, lse), want, atol=1e-4)
  q, kp, ks, kz, _, _, _, lengths, table = args
  probs = _probs(q, kp, ks, kz, lengths, table, lse, k_bits=k_bits)
  np.testing.assert_allclose(np.asarray(probs), want[2], atol=1e-5)


def test_lse_merge_of_disjoint_pages_equals_union():
  args, kw = _make_inputs(21, batch=1, kv_heads=2, group=3, head_dim=64, page_size=P,
                          max_pages=5, k_bits=4, v_bits=2, value_group=16,
                          lengths=[5 * P, 2 * P + 9])
  q, kp, ks, kz, vp, vs, vz, lengths, table = args
  split = 2  # pages [0, 2) in the first call, the rest in the second
  n1 = jnp.minimum(lengths, split * P)
  t2 = jnp.concatenate([table[:, :, split:], table[:, :, :split]], axis=-1)
  bs = B_S(1, 2)
  call = lambda n, t: qda.quantized_decode_attention(q, kp, ks, kz, vp, vs, vz, n, t, **kw,
                                                     block_sizes=bs, interpret=True)
  o1, l1 = call(n1, table)
  o2, l2 = call(lengths - n1, t2)
  o, lse = call(lengths, table)
  merged_lse = jnp.logaddexp(l1, l2)
  merged = (jnp.exp(l1 - merged_lse)[..., None] * o1 + jnp.exp(l2 - merged_lse)[..., None] * o2)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(o), atol=2e-5)
  np.testing.assert_allclose(np.asarray(merged_lse), np.asarray(lse), atol=2e-5)


def _small(k_bits=4, v_bits=4, head_dim=64, group=2, value_group=16):
  return _make_inputs(30, batch=1, kv_heads=2, group=group, head_dim=head_dim, page_size=P,
                      max_pages=2, k_bits=k_bits, v_bits=v_bits, value_group=value_group,
                      lengths=[P, 3], poison=False)


def _replace(args, **new):
  names = ["q", "kp", "ks", "kz", "vp", "vs", "vz", "lengths", "table"]
  d = dict(zip(names, args))
  d.update(new)
  return tuple(d[n] for n in names)


@pytest.mark.parametrize("change,match", [
    (lambda a, kw: (a, {**kw, "k_bits": 3}), "k_bits=3"),
    (lambda a, kw: (a, {**kw, "v_bits": 3}), "v_bits=3"),
    (lambda a, kw: (a, {**kw, "k_bits": 2}), "more bits than keys"),
    (lambda a, kw: (a, {**kw, "value_group": 24}), "value_group"),
    (lambda a, kw: (_replace(a, q=a[0][:, :3]), kw), "divisible by number of KV heads"),
    (lambda a, kw: (_replace(a, q=jnp.zeros((1, 4, 60))), kw), "k_pages must have shape"),
    (lambda a, kw: (_replace(a, ks=a[2][:, :8]), kw), "k_scale must have shape"),
    (lambda a, kw: (_replace(a, vs=None), kw), "v_scale is required"),
    (lambda a, kw: (_replace(a, lengths=a[7][:, :1]), kw), "lengths must have shape"),
    (lambda a, kw: (_replace(a, kp=a[1].astype(jnp.int32)), kw), "uint8"),
    (lambda a, kw: (a, {**kw, "key_axis": "page"}), "key_axis='page'.*channel.*token"),
    (lambda a, kw: (a, {**kw, "key_axis": "token"}), r"k_scale must have shape \(5, 16, 4\)"),
    (lambda a, kw: (a, {**kw, "starts": jnp.zeros((1, 3), jnp.int32)}), "starts must have"),
    (lambda a, kw: (a, {**kw, "starts": jnp.zeros((1, 2))}), "starts must be an integer"),
])
def test_bad_inputs_raise(change, match):
  args, kw = change(*_small())
  for fn in (qda.quantized_decode_attention, qda.quantized_decode_attention_reference):
    with pytest.raises(ValueError, match=match):
      fn(*args, **kw, interpret=True)


def test_head_dim_not_packable_raises():
  with pytest.raises(ValueError, match="not a multiple"):
    args, kw = _small()
    q = jnp.zeros((1, 4, 6))  # 6 codes do not pack at 2 bits
    kp = jnp.zeros((3, P, 1), jnp.uint8)
    qda.quantized_decode_attention(*_replace(args, q=q, kp=kp), **{**kw, "k_bits": 2,
                                                                   "v_bits": 2})


def test_triton_limits_raise_without_interpret():
  args, kw = _small(k_bits=2, v_bits=2, head_dim=32)  # 8-channel key planes: below Triton's 16
  with pytest.raises(ValueError, match="Triton dots need key plane"):
    qda.quantized_decode_attention(*args, **kw, interpret=False)
  # token keys: 32-byte key rows but 8-channel groups -> 8-wide key chunks
  args, kw = _make_inputs(31, batch=1, kv_heads=2, group=2, head_dim=64, page_size=P,
                          max_pages=2, k_bits=4, v_bits=4, value_group=8, lengths=[P, 3],
                          poison=False, key_axis="token")
  with pytest.raises(ValueError, match="Triton dots need key plane.*token keys"):
    qda.quantized_decode_attention(*args, **kw, interpret=False)
  with pytest.raises(ValueError, match="BlockSizes.num_splits"):
    B_S(num_splits=0)


def _abstract_cuda_mesh():
  try:
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                         platform="cuda")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  except TypeError as e:  # these signatures changed between jax versions
    pytest.skip(f"jax {jax.__version__}: cannot build an AbstractMesh of a CUDA device: {e}")


@pytest.mark.parametrize("k_bits,v_bits,head_dim,key_axis", [
    (16, 16, 64, "channel"), (4, 2, 128, "channel"), (8, 4, 64, "channel"),
    (4, 2, 128, "token"), (2, 2, 64, "token")])
def test_lowers_for_cuda_without_a_gpu(k_bits, v_bits, head_dim, key_axis):
  """Deviceless AOT: the Triton lowering (jaxpr -> Triton IR) runs on this CPU host."""
  args, kw = _make_inputs(40, batch=2, kv_heads=2, group=3, head_dim=head_dim, page_size=P,
                          max_pages=16, k_bits=k_bits, v_bits=v_bits, value_group=32,
                          lengths=[P, 3, 16 * P, 0], poison=False, key_axis=key_axis)
  if k_bits == 16:  # what the cache holds at 16 bits
    args = _replace(args, kp=args[1].astype(jnp.bfloat16), vp=args[4].astype(jnp.bfloat16))
  specs = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  starts = jnp.asarray([[0, 1], [3, 0]], jnp.int32)
  fn = lambda *a: qda.quantized_decode_attention(*a, **kw, block_sizes=B_S(4, 2), starts=starts)
  try:
    from jax._src.lib import triton  # noqa: F401 - the Triton dialect bindings of jaxlib
  except ImportError as e:
    pytest.skip(f"jaxlib {jax.__version__} ships no Triton MLIR bindings, so Pallas cannot "
                f"lower to Triton on this host: {e}")
  with jax.sharding.use_abstract_mesh(_abstract_cuda_mesh()):
    lowered = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "__gpu$xla.gpu.triton" in text
  assert f"quantized_decode_attention_k{k_bits}v{v_bits}" in text
