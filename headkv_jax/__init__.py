"""headkv_jax: head-aware KV-cache compression for Llama-style models in pure JAX."""

# Rotary embeddings shared by the models and the caches.
from headkv_jax.rope import RoPE, rope_inv_freq
# Attention primitives and the uncompressed cache.
from headkv_jax.attention import self_attention
from headkv_jax.dense_cache import DenseKVCache
