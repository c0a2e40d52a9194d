"""Pallas kernels of headkv-jax (depend only on jax).

Import the op's module, ``from pallas_kernels import quantized_decode_attention as qda``;
nothing is re-exported here because the function of the same name would shadow the module.
"""
