"""Errors of loading a model the user named: an unknown alias, a missing, corrupt or
unsupported checkpoint.

Each message names the value it was given and what is allowed. They are ``ValueError``s
(``ModelNotFoundError`` is a ``FileNotFoundError`` too), so library callers catch them as
before; the binaries (``experiments.cli.run``) print one as a single line and exit non-zero,
while any other exception (a bug) keeps its traceback. Head profiles have their own pair,
``headkv_jax.profile.ProfileError`` / ``ProfileNotFoundError``.

  try:
    model, tokenizer = load_model(name)
  except ModelLoadError as e:  # unknown alias, corrupt GGUF, unsupported architecture ...
    ...

This module imports nothing, so the light readers (``embedded``, ``gguf_checkpoint``,
``hf_checkpoint``) stay light.
"""


class ModelLoadError(ValueError):
  """A model source (alias, Hugging Face directory, GGUF file) cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
  """A model source, or a file it needs, does not exist."""
