"""Loads the tokenizer of a Hugging Face directory, a GGUF file or an embedded model alias.

  tokenizer = load_tokenizer("smollm2-135m")        # the embedded default model
  tokenizer = load_tokenizer("/models/Llama-3.2-1B")  # a Hugging Face checkpoint directory
  tokenizer = load_tokenizer("/models/qwen2.gguf")    # vocab converted from GGUF metadata

All three go through `transformers.AutoTokenizer`, offline (`local_files_only=True`). Turning a
GGUF vocab into a fast tokenizer takes seconds (about 3 s for SmolLM2's 49k tokens on a 2-core
CPU), so the result is kept in process and saved with `save_pretrained` under
`<cache root>/tokenizers/` (`models.cache_dirs`: `$HEADKV_JAX_CACHE`, `$XDG_CACHE_HOME/headkv_jax`
or `~/.cache/headkv_jax`), keyed by the GGUF's path, size, mtime and the transformers version;
reloading it takes a fraction of a second.
Loaders share one tokenizer object per source: do not mutate it.
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import transformers

from models import cache_dirs
from models import embedded
from models.errors import ModelLoadError, ModelNotFoundError


def default_cache_dir() -> pathlib.Path:
  """The root of headkv_jax's on-disk caches (`models.cache_dirs.cache_root`)."""
  return cache_dirs.cache_root()


def load_tokenizer(path_or_alias: str | os.PathLike,
                   cache_dir: str | os.PathLike | None = None):
  """Loads a tokenizer through `transformers.AutoTokenizer`, never touching the network.

  Args:
    path_or_alias: an alias from `models.embedded.EMBEDDED_MODELS`, a Hugging Face checkpoint
      directory, or a `.gguf` file.
    cache_dir: where converted GGUF tokenizers are saved (default `default_cache_dir()`); the
      cache is skipped, silently, where it cannot be written.

  Returns:
    A `transformers` tokenizer (shared per source; treat it as read-only).

  Raises:
    ModelNotFoundError (a FileNotFoundError): the path does not exist or an alias's package is
      not installed.
    ModelLoadError (a ValueError): an unknown alias, or a file or directory transformers cannot
      read a tokenizer from.
  """
  if embedded.is_embedded_alias(path_or_alias):
    path = embedded.embedded_gguf_path(path_or_alias)
  else:
    path = pathlib.Path(path_or_alias)
  if not path.exists():
    known = sorted(embedded.EMBEDDED_MODELS)
    raise ModelNotFoundError(
        f"tokenizer source {str(path_or_alias)!r} is neither an existing path nor an embedded "
        f"model alias (known: {known})."
    )
  path = path.resolve()
  stat = path.stat()
  cache_root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return _load_cached(str(path), stat.st_size, stat.st_mtime_ns, str(cache_root))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, size: int, mtime_ns: int, cache_root: str):
  """One tokenizer per (file version, cache root); size and mtime make edits miss the cache."""
  source = pathlib.Path(path)
  if source.is_dir():
    return _from_pretrained(source, str(source))
  if source.suffix != ".gguf":
    raise ModelLoadError(
        f"tokenizer source {path!r} is a {source.suffix or 'suffixless'} file; expected a .gguf "
        "file, a Hugging Face directory or an embedded model alias."
    )
  key = hashlib.sha256(
      f"{path}|{size}|{mtime_ns}|{transformers.__version__}".encode()
  ).hexdigest()[:16]
  cached = pathlib.Path(cache_root) / cache_dirs.TOKENIZERS / f"{source.stem}-{key}"
  if cached.is_dir():
    try:
      return _from_saved(cached)
    except ValueError:
      pass  # a damaged cache entry: convert again below
  tokenizer = _from_pretrained(source.parent, path, gguf_file=source.name)
  _save_quietly(tokenizer, cached)
  return tokenizer


def _from_saved(directory: pathlib.Path):
  """A tokenizer this module saved, built by the fast class directly when it is one.

  AutoTokenizer imports torch on first use (2.5 s of a 3 s reload), which a fast tokenizer
  never needs.
  """
  fast = transformers.PreTrainedTokenizerFast
  try:
    saved = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
  except (OSError, ValueError, AttributeError):
    saved = None
  if saved in ("PreTrainedTokenizerFast", fast.__name__):
    return _from_pretrained(directory, str(directory), tokenizer_class=fast)
  return _from_pretrained(directory, str(directory))


def _from_pretrained(directory: pathlib.Path, label: str, tokenizer_class=None, **kwargs):
  try:
    return (tokenizer_class or transformers.AutoTokenizer).from_pretrained(
        str(directory), local_files_only=True, **kwargs
    )
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ModelLoadError(
        f"transformers cannot load a tokenizer from {label!r}: {type(e).__name__}: {e}"
    ) from None


def _save_quietly(tokenizer, target: pathlib.Path) -> None:
  """save_pretrained into `target` atomically (temp dir + rename); failures only skip caching."""
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(dir=target.parent, prefix=".staging-")
  except OSError:
    return
  try:
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
  except OSError:  # unwritable, or another process saved it first (its copy is as good)
    shutil.rmtree(staging, ignore_errors=True)
