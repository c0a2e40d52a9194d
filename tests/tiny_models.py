"""Tiny random Hugging Face models (built with transformers + torch) shared by the tests."""

from __future__ import annotations

import numpy as np

TINY = dict(vocab_size=128, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def build_hf_model(kind: str, seed: int = 0, **overrides):
  """A random torch model of one family: llama, llama3, llama_linear, mistral, qwen2, tied."""
  import torch
  import transformers

  torch.manual_seed(seed)
  kw = dict(TINY, **overrides)
  if kind == "llama":
    cfg = transformers.LlamaConfig(**kw)
  elif kind == "llama3":
    cfg = transformers.LlamaConfig(rope_scaling=LLAMA3_ROPE, **kw)
  elif kind == "llama_linear":
    cfg = transformers.LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}, **kw)
  elif kind == "tied":
    cfg = transformers.LlamaConfig(tie_word_embeddings=True, **kw)
  elif kind == "mistral":
    cfg = transformers.MistralConfig(sliding_window=None, **kw)
  elif kind == "qwen2":
    cfg = transformers.Qwen2Config(**kw)
  else:
    raise ValueError(kind)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  if kind == "qwen2":  # random biases so the bias path is really exercised
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0.0, 0.5)
  return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def tiny_profile(seed: int, roles, num_q_heads: int = 6):
  """A random head profile of a tiny model: ``roles [layers, kv_heads]``, uniform scores."""
  from headkv_jax import profile as profile_lib

  roles = np.asarray(roles)
  rng = np.random.default_rng(seed)
  return profile_lib.HeadProfile(
      model_id="tiny", num_layers=roles.shape[0], num_kv_heads=roles.shape[1],
      num_q_heads=num_q_heads,
      scores={n: rng.random(roles.shape) for n in profile_lib.SCORE_NAMES}, roles=roles)
