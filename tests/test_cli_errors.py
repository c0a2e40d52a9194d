"""User errors as one clear line, and the on-disk caches the binaries turn on.

Library callers get typed exceptions that name the value and what is allowed
(`models.errors.ModelLoadError`, `headkv_jax.profile.ProfileError`); every binary, started
through `experiments.cli.run`, prints them as one stderr line with exit status 1 and no
traceback. The binaries also turn on JAX's persistent compilation cache and the converted-params
cache by default. Fixtures are tiny (a config.json, a 2-tensor GGUF, a 2-layer random Llama).

  .venv/bin/python -m pytest tests/test_cli_errors.py -q
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

from absl import app
from absl import flags
from absl.testing import flagsaver
import gguf
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cli
from headkv_jax import profile as profile_lib
from models import cache_dirs
from models import config as config_lib
from models import hf_checkpoint
from models import loading
from models import params_cache
from models import tokenizer as tokenizer_lib
from models.errors import ModelLoadError, ModelNotFoundError
from tests.tiny_models import build_hf_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
_TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64,
                    hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
_GPT2_CONFIG = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=768, n_layer=12,
                    n_head=12, vocab_size=50257)


def _write_json(path: pathlib.Path, value) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value))
  return path


def _truncated_gguf(path: pathlib.Path) -> pathlib.Path:
  """A llama GGUF of one tensor, cut in the middle of its data."""
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_uint32("llama.block_count", 1)
  writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  data = path.read_bytes()
  path.write_bytes(data[:len(data) - 4096])
  return path


# --- the library: typed errors that name the value ---------------------------------------------


def test_unknown_alias_names_it_and_the_aliases(tmp_path):
  with pytest.raises(ModelNotFoundError, match=r"Unknown model 'llama-9000'.*smollm2-135m"):
    loading.load_model("llama-9000")
  with pytest.raises(FileNotFoundError, match=r"Unknown model '.*nowhere'"):  # still one
    loading.load_model(tmp_path / "nowhere")


def test_truncated_gguf(tmp_path):
  path = _truncated_gguf(tmp_path / "cut.gguf")
  with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated or not GGUF"):
    loading.load_model(path, with_tokenizer=False)
  with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated or not GGUF"):
    loading.load_config(path)


def test_empty_directory(tmp_path):
  with pytest.raises(ModelNotFoundError, match=r"has no config\.json; found an empty directory"):
    loading.load_model(tmp_path, with_tokenizer=False)


def test_unsupported_architecture_is_named_before_missing_keys(tmp_path):
  _write_json(tmp_path / "gpt2" / "config.json", _GPT2_CONFIG)
  match = (r"config\.json'?: unsupported architecture GPT2LMHeadModel \(model_type 'gpt2'\); "
           r"supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
  with pytest.raises(ModelLoadError, match=match):
    loading.load_model(tmp_path / "gpt2", with_tokenizer=False)
  with pytest.raises(ModelLoadError, match=match):
    loading.load_config(tmp_path / "gpt2")
  with pytest.raises(ModelLoadError, match="unsupported architecture with model_type 'gpt2'"):
    hf_checkpoint.normalize_hf_config({"model_type": "gpt2", "n_embd": 8})


def test_supported_architectures_match_the_config():
  assert set(hf_checkpoint.SUPPORTED_ARCHITECTURES.values()) == set(
      config_lib.SUPPORTED_MODEL_TYPES)


def test_missing_config_key_is_named():
  raw = dict(_TINY_CONFIG)
  del raw["intermediate_size"]
  with pytest.raises(ModelLoadError, match=r"config of model 'm': missing key 'intermediate_size'"):
    config_lib.LlamaConfig.from_hf(raw, model_id="m")


def test_load_config_reads_no_weights(tmp_path):
  _write_json(tmp_path / "m" / "config.json", _TINY_CONFIG)  # no safetensors at all
  config = loading.load_config(tmp_path / "m")
  assert (config.num_layers, config.num_kv_heads) == (2, 2)


def test_profile_errors(tmp_path):
  with pytest.raises(profile_lib.ProfileNotFoundError, match=r"'.*missing\.json' does not exist"):
    profile_lib.HeadProfile.load(tmp_path / "missing.json")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(profile_lib.ProfileError, match=r"bad\.json' is not valid JSON"):
    profile_lib.HeadProfile.load(tmp_path / "bad.json")
  with pytest.raises(profile_lib.ProfileError, match="cannot read head profile"):
    profile_lib.HeadProfile.load(tmp_path)  # a directory
  assert issubclass(profile_lib.ProfileNotFoundError, FileNotFoundError)
  assert issubclass(profile_lib.ProfileError, ValueError)


# --- one line from the binaries ------------------------------------------------------------------


@pytest.fixture
def jax_cache_config():
  """Restores JAX's compilation-cache options (and its once-per-process decision) after a test."""
  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {n: getattr(jax.config, n) for n in names}
  default_params = loading.default_params_cache()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  loading.set_default_params_cache(default_params)


@pytest.mark.parametrize("error, code", [
    (ModelNotFoundError("Unknown model 'x': not an embedded alias (smollm2-135m)\nand more"), 1),
    (profile_lib.ProfileError("head profile 'p.json' is not valid JSON"), 1),
    (app.UsageError("--budget=-1 is negative"), 1),
])
def test_wrap_prints_one_line(error, code, capsys, jax_cache_config):
  def main(argv):
    del argv
    raise error

  with flagsaver.flagsaver():
    flags.FLAGS(["prog", "--compilation_cache_dir=", "--params_cache_dir="])
    with pytest.raises(SystemExit) as exit_info:
      cli.wrap(main)(["prog"])
  assert exit_info.value.code == code
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"{pathlib.Path(sys.argv[0]).stem}: error: ")
  assert " ".join(str(error).split()) in err


def test_wrap_keeps_bugs_as_tracebacks(jax_cache_config):
  def main(argv):
    del argv
    raise ValueError("a bug, not a user's error")

  with flagsaver.flagsaver():
    flags.FLAGS(["prog", "--compilation_cache_dir=", "--params_cache_dir="])
    with pytest.raises(ValueError, match="a bug"):
      cli.wrap(main)(["prog"])


def _run_binary(module: str, *args: str, cache_root: pathlib.Path):
  env = dict(os.environ, HEADKV_JAX_CACHE=str(cache_root), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line(proc, program: str, match: str) -> None:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 1, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), proc.stderr
  assert re.search(match, lines[0]), lines[0]


def _bad_model(case: str, tmp_path: pathlib.Path) -> str:
  """The --model value of one error case, its files made under ``tmp_path``."""
  if case == "truncated":
    return str(_truncated_gguf(tmp_path / "cut.gguf"))
  if case == "empty":
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")
  if case == "gpt2":
    return str(_write_json(tmp_path / "gpt2" / "config.json", _GPT2_CONFIG).parent)
  return {"alias": "llama-9000", "missing": str(tmp_path / "nowhere")}[case]


@pytest.mark.parametrize("case, match", [
    ("alias", r"Unknown model 'llama-9000': not an embedded alias \(smollm2-135m\)"),
    ("truncated", r"cut\.gguf' \(truncated or not GGUF\?\)"),
    ("empty", r"'.*empty' has no config\.json; found an empty directory"),
    ("missing", r"Unknown model '.*nowhere'"),
    ("gpt2", r"unsupported architecture GPT2LMHeadModel .*supported: LlamaForCausalLM"),
])
def test_generate_prints_one_line(case, match, tmp_path):
  proc = _run_binary("generate", f"--model={_bad_model(case, tmp_path)}", "--prompt=hi",
                     "--max_new_tokens=1", cache_root=tmp_path / "cache")
  _assert_one_line(proc, "generate", match)


@pytest.mark.parametrize("case, match", [
    ("missing profile", r"--profile='.*missing\.json'.*does not exist"),
    ("corrupt profile", r"--profile='.*bad\.json'.*is not valid JSON"),
    ("gpt2", r"--model='.*gpt2'.*unsupported architecture GPT2LMHeadModel"),
    ("truncated", r"--model='.*cut\.gguf'.*truncated or not GGUF"),
])
def test_phase_errors_print_one_line(case, match, tmp_path):
  """A phase binary checks --model (its config, no weights) and --profile before any work."""
  model = _write_json(tmp_path / "m" / "config.json", _TINY_CONFIG).parent  # config only
  profile = tmp_path / "missing.json"
  if case == "corrupt profile":
    profile = tmp_path / "bad.json"
    profile.write_text('{"format": ')
  elif case in ("gpt2", "truncated"):
    model = _bad_model(case, tmp_path)
  proc = _run_binary("phase1", f"--model={model}", f"--profile={profile}",
                     f"--output_dir={tmp_path / 'out'}", "--methods=full", "--lengths=100",
                     "--num_samples=1", cache_root=tmp_path / "cache")
  _assert_one_line(proc, "phase1", match)


# --- JAX's persistent compilation cache ----------------------------------------------------------


def test_compilation_cache_flag_sets_jax_config(tmp_path, jax_cache_config):
  cli.setup_compilation_cache(str(tmp_path / "jc"))
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jc")
  assert jax.config.jax_enable_compilation_cache is True
  assert jax.config.jax_persistent_cache_min_compile_time_secs == cli.MIN_COMPILE_SECS
  assert jax.config.jax_persistent_cache_min_entry_size_bytes == 0
  cli.setup_compilation_cache("")
  assert jax.config.jax_compilation_cache_dir is None
  assert jax.config.jax_enable_compilation_cache is False


def test_cache_root_follows_xdg_and_headkv_jax_cache(monkeypatch, tmp_path):
  monkeypatch.delenv("HEADKV_JAX_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cache_dirs.cache_dir(cache_dirs.JAX_CACHE) == tmp_path / "headkv_jax" / "jax_cache"
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert cache_dirs.cache_root() == pathlib.Path.home() / ".cache" / "headkv_jax"
  monkeypatch.setenv("HEADKV_JAX_CACHE", str(tmp_path / "own"))
  assert cache_dirs.cache_dir(cache_dirs.PARAMS) == tmp_path / "own" / "params"
  assert tokenizer_lib.default_cache_dir() == tmp_path / "own"


_COMPILE_TWICE = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from experiments import cli

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
    cli.setup_compilation_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny programs too

    @jax.jit
    def f(x):
      for i in range(20):
        x = jnp.sin(x) * 1.5 + i
      return x

    f(jnp.ones(8)).block_until_ready()
    print("HITS", len(hits))
""")


def test_compilation_cache_is_reused_by_the_next_process(tmp_path):
  """Two processes compile the same program: the first writes entries, the second hits them."""
  directory = tmp_path / "jc"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  runs = [subprocess.run([sys.executable, "-c", _COMPILE_TWICE, str(directory)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120) for _ in range(2)]
  for run in runs:
    assert run.returncode == 0, run.stderr
  assert "HITS 0" in runs[0].stdout
  assert any(p.name.startswith("jit_f-") for p in directory.iterdir())
  assert "HITS 0" not in runs[1].stdout, runs[1].stdout


# --- the converted-params cache ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny") / "hf"
  build_hf_model("llama").save_pretrained(path)
  return path


def _logits(model):
  return np.asarray(model(jnp.asarray(np.arange(12)[None] % 128))[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_cache_round_trip_skips_conversion(tiny_hf_dir, tmp_path, monkeypatch, dtype):
  first, _ = loading.load_model(tiny_hf_dir, dtype, with_tokenizer=False, params_cache=tmp_path)
  entries = list(tmp_path.glob("*.safetensors"))
  assert len(entries) == 1 and f"-{dtype}-" in entries[0].name

  def no_conversion(source):
    raise AssertionError(f"converted {source} again")

  monkeypatch.setattr(loading, "read_checkpoint", no_conversion)
  second, _ = loading.load_model(tiny_hf_dir, dtype, with_tokenizer=False, params_cache=tmp_path)
  assert second.dtype == first.dtype and second.config == first.config
  np.testing.assert_array_equal(_logits(first), _logits(second))


def test_corrupt_params_cache_entry_is_converted_again(tiny_hf_dir, tmp_path, caplog):
  first, _ = loading.load_model(tiny_hf_dir, with_tokenizer=False, params_cache=tmp_path)
  (entry,) = tmp_path.glob("*.safetensors")
  entry.write_bytes(entry.read_bytes()[:500])  # truncated
  second, _ = loading.load_model(tiny_hf_dir, with_tokenizer=False, params_cache=tmp_path)
  assert "ignoring unreadable params cache entry" in caplog.text
  np.testing.assert_array_equal(_logits(first), _logits(second))
  assert params_cache.restore(entry, jnp.float32) is not None  # rewritten, readable again


def test_params_cache_key_follows_the_source(tiny_hf_dir, tmp_path):
  path = params_cache.entry_path(tmp_path, tiny_hf_dir, jnp.float32)
  assert path != params_cache.entry_path(tmp_path, tiny_hf_dir, jnp.bfloat16)
  config = tiny_hf_dir / "config.json"
  stat = config.stat()
  os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  try:
    assert params_cache.entry_path(tmp_path, tiny_hf_dir, jnp.float32) != path
  finally:
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_params_cache_key_hashes_the_code_that_loading_imports():
  """The key hashes the model, its config, the converters and the readers (what loading
  imports, followed through their imports), not generation or the runner: editing those
  must not convert the embedded model again (+5 s a run), editing the model must."""
  names = {path.stem for path in params_cache._code_files()}
  assert {"llama", "config", "weights", "gguf_checkpoint", "hf_checkpoint", "loading",
          "params_cache"} <= names
  assert not names & {"generation", "runner", "layerwise", "method_driver", "shared_prefill"}


def test_default_params_cache_is_for_embedded_aliases_only(tiny_hf_dir, tmp_path,
                                                           jax_cache_config):
  loading.set_default_params_cache(tmp_path)
  assert loading._cache_entry(str(tiny_hf_dir), tiny_hf_dir, jnp.float32, None) is None
  gguf_file = tmp_path / "SmolLM2.gguf"
  gguf_file.write_bytes(b"GGUF")
  entry = loading._cache_entry("smollm2-135m", gguf_file, jnp.float32, None)
  assert entry is not None and entry.parent == tmp_path
  assert loading._cache_entry("smollm2-135m", gguf_file, jnp.float32, False) is None
  loading.set_default_params_cache("")
  assert loading._cache_entry("smollm2-135m", gguf_file, jnp.float32, None) is None


def test_saved_fast_tokenizer_reloads_without_auto_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  import transformers  # pylint: disable=g-import-not-at-top
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2},
                                                             unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
  fast = tokenizer_lib._from_saved(tmp_path)
  assert isinstance(fast, transformers.PreTrainedTokenizerFast)
  assert fast.encode("a b c") == [1, 2, 0]


def test_method_labels():
  """bench_cache's `--methods` labels are phase 3's (`experiments.labels`): any MethodSpec field
  in brackets, commas inside them re-joined; the given budget and kv_bits unless a label sets
  them (full gets budget 0); an unknown field, a value of the wrong type or a bad position mode
  is a one-line usage error naming it."""
  from experiments import labels  # pylint: disable=g-import-not-at-top
  spec = labels.method_spec("h2o", 64, "4/2")
  assert (spec.name, spec.budget, spec.kv_bits, spec.position_mode) == (
      "h2o", 64, "4/2", "original")
  assert labels.method_spec("full", 64, "16").budget == 0
  split = ["full", "snapkv[position_mode=cache_relative", "kv_bits=roles:8/8", "4/2", "2/2",
           "sinks=0]"]
  joined = labels.join_brackets(split)
  assert joined[1] == "snapkv[position_mode=cache_relative,kv_bits=roles:8/8,4/2,2/2,sinks=0]"
  spec = labels.method_spec(joined[1], 64, "16")
  assert (spec.position_mode, spec.kv_bits, spec.n_sink) == (
      "cache_relative", "roles:8/8,4/2,2/2", 0)
  for bad, named in (("h2o[bits=4]", "'bits=4'"), ("h2o[window=x]", "int"),
                     ("h2o[position_mode=rolled]", "rolled"), ("h2o(4)", "'h2o(4)'")):
    with pytest.raises(app.UsageError, match=re.escape(named)):
      labels.method_spec(bad, 64, "16")
