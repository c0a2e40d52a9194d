"""headkv_jax: head-aware KV-cache compression for Llama-style models in pure JAX.

The cache contract every model call uses::

    out, cache = cache.attend(layer, q, k, v, positions, rope)

``DenseKVCache`` keeps everything; ``PagedKVCache`` keeps per-(layer, KV head) budgets in page
pools sized from those budgets, stores each KV head at its own bits (16 / 8 / 4 / 2, HAQ-KV)
and evicts with a policy. ``MethodSpec`` / ``make_cache`` build either from a method name, an
average budget and a bit scheme (``parse_kv_bits``); head profiles, ``allocate_budgets`` and
``allocate_bits`` give the per-head budgets and bits of the head-aware method.
"""

# Rotary embeddings shared by the models and the caches.
from headkv_jax.rope import RoPE, rope_inv_freq
# Attention primitives.
from headkv_jax.attention import self_attention
# Caches.
from headkv_jax.dense_cache import DenseKVCache
from headkv_jax.paged_cache import PagedKVCache
# Eviction policies.
from headkv_jax.policies import POLICY_NAMES, Policy, make_policy, pyramid_budgets
# Methods by name (policy + budget allocation).
from headkv_jax.methods import (METHODS, CachePlan, MethodSpec, make_cache, method_budgets,
                                plan_cache)
# Head profiling and budget allocation.
from headkv_jax.head_scores import Role, assign_roles, reduce_to_kv_heads
from headkv_jax.profile import HeadProfile, build_profile, plot_heatmaps
from headkv_jax.allocation import allocate_budgets
# Per-KV-head storage bits (HAQ-KV).
from headkv_jax.bits import BitScheme, allocate_bits, bits_label, parse_kv_bits
