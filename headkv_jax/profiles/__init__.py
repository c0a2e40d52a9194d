"""Head profiles shipped with the library, one ``<model_id>.json`` per profiled model.

Each was measured with ``experiments/profile_heads.py`` (its settings are inside the JSON,
under ``probe_settings``) and has a heatmap ``<model_id>.png`` beside it in the repository.

  path = shipped_profile('smollm2-135m')      # -> .../headkv_jax/profiles/smollm2-135m.json
  profile = load_shipped_profile('smollm2-135m')  # a headkv_jax.profile.HeadProfile

Profile another model with::

  python -m experiments.profile_heads --model=<alias or path> --output=<path>.json
"""

from __future__ import annotations

import pathlib

from headkv_jax import profile as profile_lib

PROFILES_DIR = pathlib.Path(__file__).resolve().parent


def shipped_model_ids() -> tuple[str, ...]:
  """The model ids that have a shipped profile, sorted."""
  return tuple(sorted(p.stem for p in PROFILES_DIR.glob('*.json')))


def shipped_profile(model_id: str) -> pathlib.Path:
  """The path of the shipped profile of ``model_id`` (an alias such as 'smollm2-135m').

  Raises:
    ProfileNotFoundError (a FileNotFoundError): no profile is shipped for ``model_id``.
  """
  path = PROFILES_DIR / f'{model_id}.json'
  if not model_id or '/' in model_id or '\\' in model_id or not path.is_file():
    raise profile_lib.ProfileNotFoundError(
        f'no shipped head profile for model {model_id!r}; shipped: '
        f'{list(shipped_model_ids())}. Measure one with `python -m experiments.profile_heads '
        f'--model={model_id} --output=<path>.json`.')
  return path


def load_shipped_profile(model_id: str) -> profile_lib.HeadProfile:
  """Loads the shipped profile of ``model_id`` and checks it is that model's."""
  profile = profile_lib.HeadProfile.load(shipped_profile(model_id))
  if profile.model_id != model_id:
    raise profile_lib.ProfileError(f'shipped profile {shipped_profile(model_id)} is for model '
                                   f'{profile.model_id!r}, not {model_id!r}.')
  return profile
