"""The head profile: per-KV-head scores and roles of one model, saved as JSON.

A profile is measured once per model (probe prompts -> attention maps -> the scores in
:mod:`headkv_jax.head_scores`, averaged and folded into KV heads) and then read by
:mod:`headkv_jax.allocation` to give each KV head its token budget. It records the model it
came from, so using it with another model is an error rather than a silent mis-allocation.

  profile = build_profile('smollm2-135m', q_head_scores, num_kv_heads=3, probe_settings=...)
  profile.save('profiles/smollm2-135m.json')
  profile = HeadProfile.load('profiles/smollm2-135m.json')
  profile.check_matches('smollm2-135m', num_layers=30, num_kv_heads=3)
  plot_heatmaps(profile, 'profile.png')

A profile that cannot be read, is malformed or belongs to another model raises
:class:`ProfileError` (a ValueError; :class:`ProfileNotFoundError`, also a FileNotFoundError,
when the file is missing) naming the file and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Mapping

import numpy as np

from headkv_jax import head_scores

SCORE_NAMES = ('retrieval', 'retrieval_reasoning', 'induction', 'local')
PROFILE_VERSION = 1  # bump when the JSON layout changes
_FORMAT = 'headkv_jax.HeadProfile'


class ProfileError(ValueError):
  """A head profile cannot be read, is malformed or belongs to another model."""


class ProfileNotFoundError(ProfileError, FileNotFoundError):
  """A head profile file does not exist (or a model has no shipped profile)."""


@dataclasses.dataclass(frozen=True)
class HeadProfile:
  """Scores and roles of every (layer, KV head) of one model.

  Attributes:
    model_id: which model was profiled (e.g. 'smollm2-135m').
    num_layers: decoder layers.
    num_kv_heads: KV heads per layer (the unit the scores are given for).
    num_q_heads: query heads per layer (before folding into KV heads).
    scores: name -> ``[num_layers, num_kv_heads]`` float64, one per name in SCORE_NAMES.
    roles: ``[num_layers, num_kv_heads]`` int32 :class:`head_scores.Role` values.
    probe_settings: how the scores were measured (probe lengths, seeds, window, top_n,
      the query-to-KV reduction ...), JSON-serializable.
    version: the profile format version.
  """

  model_id: str
  num_layers: int
  num_kv_heads: int
  num_q_heads: int
  scores: Mapping[str, np.ndarray]
  roles: np.ndarray
  probe_settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  version: int = PROFILE_VERSION

  def __post_init__(self):
    source = f'for model {self.model_id!r}'
    scores = {name: np.asarray(v, dtype=np.float64) for name, v in self.scores.items()}
    object.__setattr__(self, 'scores', scores)
    object.__setattr__(self, 'roles', np.asarray(self.roles, dtype=np.int32))
    object.__setattr__(self, 'probe_settings', dict(self.probe_settings))
    _validate(vars(self), source)

  def check_matches(self, model_id: str, num_layers: int, num_kv_heads: int) -> None:
    """Raises ProfileError unless this profile was measured on that model shape."""
    mine = (self.model_id, self.num_layers, self.num_kv_heads)
    theirs = (model_id, int(num_layers), int(num_kv_heads))
    if mine != theirs:
      raise ProfileError(
          f'head profile is for model {self.model_id!r} ({self.num_layers} layers, '
          f'{self.num_kv_heads} KV heads) but is used with model {model_id!r} '
          f'({num_layers} layers, {num_kv_heads} KV heads); profile that model first.')

  def to_json_dict(self) -> dict[str, Any]:
    return {
        'format': _FORMAT,
        'version': self.version,
        'model_id': self.model_id,
        'num_layers': self.num_layers,
        'num_kv_heads': self.num_kv_heads,
        'num_q_heads': self.num_q_heads,
        'scores': {name: v.tolist() for name, v in self.scores.items()},
        'roles': self.roles.tolist(),
        'role_names': list(head_scores.ROLE_NAMES),
        'probe_settings': self.probe_settings,
    }

  def save(self, path: str | os.PathLike) -> None:
    """Writes the profile as JSON (parent folders are created)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w') as f:
      json.dump(self.to_json_dict(), f, indent=1, allow_nan=False)
      f.write('\n')

  @classmethod
  def load(cls, path: str | os.PathLike) -> 'HeadProfile':
    """Reads and validates a profile written by :meth:`save` (ProfileError otherwise)."""
    path = os.fspath(path)
    data = _read_json(path)
    if not isinstance(data, dict) or data.get('format') != _FORMAT:
      raise ProfileError(f'profile {path} is not a {_FORMAT} JSON file.')
    if data.get('version') != PROFILE_VERSION:
      raise ProfileError(f'profile {path} has version {data.get("version")!r}; this code '
                         f'reads version {PROFILE_VERSION}.')
    try:
      fields = {f.name: data[f.name] for f in dataclasses.fields(cls)}
    except KeyError as e:
      raise ProfileError(f'profile {path} lacks field {e.args[0]!r}.') from None
    try:
      scores = {name: np.asarray(v, dtype=np.float64)
                for name, v in dict(fields['scores']).items()}
      roles = np.asarray(fields['roles'], dtype=np.float64)
    except (TypeError, ValueError) as e:
      raise ProfileError(f'profile {path} has a score or roles that is not a '
                         f'[num_layers, num_kv_heads] number array: {e}') from None
    fields.update(scores=scores, roles=roles)
    _validate(fields, path)  # first with the path in the messages
    return cls(**fields)


def _read_json(path: str) -> Any:
  """The JSON in ``path``; ProfileNotFoundError / ProfileError name the file."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)  # NaN literals parse; _validate names them
  except FileNotFoundError:
    raise ProfileNotFoundError(f'head profile {path!r} does not exist.') from None
  except OSError as e:
    raise ProfileError(f'cannot read head profile {path!r}: {e.strerror or e}.') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ProfileError(f'head profile {path!r} is not valid JSON ({e}); expected a '
                       f'{_FORMAT} file written by HeadProfile.save.') from None


def _validate(fields: Mapping[str, Any], source: str) -> None:
  """Checks a profile's fields (a dict of HeadProfile's field names); names ``source``."""
  num_layers, num_kv_heads = fields['num_layers'], fields['num_kv_heads']
  num_q_heads, scores = fields['num_q_heads'], fields['scores']
  shape = (num_layers, num_kv_heads)
  if not all(isinstance(n, numbers.Integral) and n >= 1 for n in (*shape, num_q_heads)) or (
      num_q_heads % num_kv_heads):
    raise ProfileError(f'profile {source}: need positive integer num_layers, num_kv_heads, '
                       f'num_q_heads, num_q_heads divisible by num_kv_heads. Got {num_layers}, '
                       f'{num_kv_heads}, {num_q_heads}.')
  if sorted(scores) != sorted(SCORE_NAMES):
    raise ProfileError(f'profile {source} has scores {sorted(scores)}; expected '
                       f'{list(SCORE_NAMES)}.')
  for name in SCORE_NAMES:
    value = np.asarray(scores[name])
    if value.shape != shape:
      raise ProfileError(f'profile {source} has score {name!r} of shape {value.shape}; '
                         f'expected [num_layers, num_kv_heads] = {shape}.')
    if np.isnan(value).any():
      where = tuple(int(i) for i in np.argwhere(np.isnan(value))[0])
      raise ProfileError(f'profile {source} has NaN in score {name!r} (first at '
                         f'[layer, kv_head] = {where}).')
  roles = np.asarray(fields['roles'])
  if roles.shape != shape:
    raise ProfileError(f'profile {source} has roles of shape {roles.shape}; expected {shape}.')
  if not np.isin(roles, [int(r) for r in head_scores.Role]).all():
    raise ProfileError(f'profile {source} has roles outside '
                       f'{dict(enumerate(head_scores.ROLE_NAMES))}: '
                       f'{sorted(set(roles.reshape(-1).tolist()))}.')


def build_profile(model_id: str, q_head_scores: Mapping[str, Any], num_kv_heads: int,
                  probe_settings: Mapping[str, Any] | None = None, reduce: str = 'mean',
                  normalize: str = 'max') -> HeadProfile:
  """Builds a profile from probe-averaged query-head scores.

  Args:
    model_id: the profiled model.
    q_head_scores: name -> ``[layers, q_heads]`` (every name in SCORE_NAMES).
    num_kv_heads: KV heads per layer; query heads fold into them by ``reduce``.
    probe_settings: recorded as is (plus the reduce/normalize rules used here).
    reduce: 'mean' or 'max' over each KV head's query group.
    normalize: how :func:`head_scores.assign_roles` puts scores on one scale.
  """
  missing = [n for n in SCORE_NAMES if n not in q_head_scores]
  if missing:
    raise ValueError(f'q_head_scores lacks {missing}; expected {list(SCORE_NAMES)}.')
  shapes = {np.shape(q_head_scores[n]) for n in SCORE_NAMES}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f'every score must be one [layers, q_heads] shape. Got {shapes}.')
  num_layers, num_q_heads = next(iter(shapes))
  scores = {n: head_scores.reduce_to_kv_heads(q_head_scores[n], num_kv_heads, reduce)
            for n in SCORE_NAMES}  # name -> [layers, kv_heads]
  roles = head_scores.assign_roles(scores['retrieval'], scores['induction'],
                                   scores['local'], normalize)
  settings = dict(probe_settings or {}, reduce=reduce, normalize=normalize)
  return HeadProfile(model_id=model_id, num_layers=num_layers, num_kv_heads=num_kv_heads,
                     num_q_heads=num_q_heads, scores=scores, roles=roles,
                     probe_settings=settings)


def plot_heatmaps(profile: HeadProfile, path: str | os.PathLike) -> None:
  """Writes a PNG: one layer x KV-head heatmap per score, plus the roles map."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = len(SCORE_NAMES) + 1
  height = max(3.0, 0.18 * profile.num_layers + 1.5)
  width = max(1.2, 0.35 * profile.num_kv_heads + 1.0)
  fig, axes = plt.subplots(1, panels, figsize=(panels * (width + 0.8), height),
                           squeeze=False)
  axes = axes[0]
  for ax, name in zip(axes, SCORE_NAMES):
    image = ax.imshow(profile.scores[name], aspect='auto', cmap='viridis',
                      interpolation='nearest')
    ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.08)
  role_cmap = colors.ListedColormap(['tab:red', 'tab:blue', 'tab:gray'])
  ax = axes[-1]
  image = ax.imshow(profile.roles, aspect='auto', cmap=role_cmap, vmin=-0.5, vmax=2.5,
                    interpolation='nearest')
  ax.set_title('role', fontsize=9)
  bar = fig.colorbar(image, ax=ax, fraction=0.08, ticks=[0, 1, 2])
  bar.ax.set_yticklabels(head_scores.ROLE_NAMES, fontsize=7)
  for ax in axes:
    ax.set_xlabel('KV head', fontsize=8)
    ax.set_ylabel('layer', fontsize=8)
    ax.set_xticks(range(profile.num_kv_heads))
    ax.tick_params(labelsize=7)
  fig.suptitle(f'head profile: {profile.model_id}', fontsize=10)
  fig.tight_layout()
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
