"""The embedded SmolLM2-135M GGUF end to end: numerics vs transformers, generation, passkey."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
  from models.loading import load_model
  from models.runner import ModelRunner
  model, tokenizer = load_model("smollm2-135m")
  return ModelRunner(model), tokenizer


@pytest.fixture(scope="module")
def torch_smollm2():
  """transformers' PyTorch Llama holding the weights transformers itself reads from the GGUF."""
  import torch
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  from models.embedded import embedded_gguf_path

  path = embedded_gguf_path("smollm2-135m")
  config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
  tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in loaded["tensors"].items()}
  model.load_state_dict(tensors, strict=False)
  model.tie_weights()
  return model


def _text_tokens(tokenizer, n):
  import pydoc_data.topics
  text = " ".join(pydoc_data.topics.topics.values())
  return tokenizer.encode(text, add_special_tokens=False)[:n]


def test_logits_match_transformers_on_512_tokens(smollm2, torch_smollm2):
  """Our GGUF loading + forward vs transformers on the same file: max |Δlogits| < 1e-3."""
  import torch
  runner, tokenizer = smollm2
  tokens = np.array([_text_tokens(tokenizer, 512)], np.int32)
  ours, _ = runner.forward(tokens)
  with torch.no_grad():
    ref = torch_smollm2(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(np.asarray(ours) - ref).max() < 1e-3


def test_greedy_tokens_match_transformers(smollm2, torch_smollm2):
  """32 greedy tokens identical to transformers' generate."""
  import torch
  from models.generation import generate
  runner, tokenizer = smollm2
  prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Write a short poem about the sea."}],
      add_generation_prompt=True, tokenize=True)
  prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
  ours = generate(runner, [prompt], 32, eos_ids=[]).tokens[0]
  with torch.no_grad():
    ref = torch_smollm2.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False)[0, len(prompt):].tolist()
  assert ours == ref


def test_ragged_batch_equals_each_prompt_alone(smollm2):
  """Prompts of different lengths in one batch generate what each generates alone."""
  from models.generation import generate
  runner, tokenizer = smollm2
  texts = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a small village by the mountains, there lived"]
  prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
  batch = generate(runner, prompts, 12, eos_ids=[]).tokens
  for p, got in zip(prompts, batch):
    assert got == generate(runner, [p], 12, eos_ids=[]).tokens[0]


def test_passkey_retrieval_at_2k_tokens(smollm2):
  """A 5-digit pass key buried in ~2k tokens of filler is retrieved (3 depths)."""
  from experiments.tasks import make_task
  from models.generation import generate
  runner, tokenizer = smollm2
  hits = 0
  for index in range(3):
    sample = make_task("passkey", tokenizer, 2000, seed=0, index=index, depth=0.2 + 0.3 * index,
                       chat=False)
    out = generate(runner, [sample.prompt_tokens], 8).tokens[0]
    hits += sample.score(tokenizer.decode(out, skip_special_tokens=True)) == 1.0
  assert hits == 3
