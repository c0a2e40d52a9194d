"""Method labels and bit-scheme lists as the binaries' flags write them (no flags defined here).

A method label is a method name, optionally with MethodSpec fields in brackets:
``snapkv``, ``headaware[pool_kernel=7,sinks=0]``, ``h2o[kv_bits=roles:8/8,4/2,2/2]``,
``snapkv[position_mode=cache_relative,kv_bits=4/2]``. absl's list flags split at every comma,
so :func:`join_brackets` and :func:`join_schemes` put back what a label or a scheme holds.
"""

from __future__ import annotations

import dataclasses
import re

from absl import app

from headkv_jax import bits as bits_lib
from headkv_jax import methods as methods_lib
from headkv_jax.head_scores import ROLE_NAMES

# A scheme's '@' option (group=, residual=, fp_sinks=).
SCHEME_OPTION = re.compile(r'^\s*(' + '|'.join(bits_lib.OPTIONS) + r')\s*=', re.I)
_BIT_PAIR = re.compile(r'^\s*\d+\s*(/\s*\d+\s*)?$')  # '4/2' or '8': a role-table entry
# Short names a label may use for MethodSpec fields.
FIELD_ALIASES = {'sinks': 'n_sink', 'gqa': 'gqa_reduce', 'score': 'score_name'}
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(methods_lib.MethodSpec)
                    if f.name not in ('name', 'budget'))
_LABEL = re.compile(r'^(\w+)(?:\[(.*)\])?$')


def join_brackets(values):
  """Re-joins list items absl split inside brackets: ['a[x=1', 'y=2]', 'b'] -> ['a[x=1,y=2]', 'b']
  (labels such as `headaware[pool_kernel=7,sinks=0]` hold commas)."""
  out, depth = [], 0
  for v in values:
    if depth > 0:
      out[-1] += ',' + v
    else:
      out.append(v)
    depth += v.count('[') - v.count(']')
  return out


def join_schemes(values):
  """Re-joins what absl split at commas inside one scheme: a role table (['16', 'roles:8',
  '4/2', '2', 'avg:3'] -> ['16', 'roles:8,4/2,2', 'avg:3']; a table has one entry per role)
  and ``@`` options (['roles@group=64', 'residual=16'] -> ['roles@group=64,residual=16'])."""
  out = []
  for v in values:
    last = out[-1].strip().lower() if out else ''
    in_table = (last.startswith('roles:') and '@' not in last
                and last.count(',') < len(ROLE_NAMES) - 1)
    if (in_table and _BIT_PAIR.match(v.partition('@')[0])) or (
        '@' in last and SCHEME_OPTION.match(v)):
      out[-1] += ',' + v
    else:
      out.append(v)
  return out


def _parts(inner: str) -> list[str]:
  """The comma-separated parts of a label's brackets; a role table's entries and a scheme's
  `@` options stay with their `kv_bits=...` part ('kv_bits=roles:8/8,4/2,2/2,sinks=0' -> 2
  parts, 'kv_bits=roles@group=64,residual=16' -> 1)."""
  parts = []
  for part in (p.strip() for p in inner.split(',')):
    if parts and parts[-1].startswith('kv_bits=') and (
        '=' not in part or SCHEME_OPTION.match(part)):
      joined = join_schemes([parts[-1][len('kv_bits='):], part])
      if len(joined) == 1:
        parts[-1] = 'kv_bits=' + joined[0]
        continue
    parts.append(part)
  return parts


def parse_method_label(label: str, bare: bool = False) -> tuple[str, dict, list[str]]:
  """``(name, fields, bare parts)`` of ``name[field=value,...]``: ``fields`` are MethodSpec
  fields (or :data:`FIELD_ALIASES`) typed like MethodSpec's defaults (text fields such as
  kv_bits take the text); with ``bare``, parts without ``=`` are returned for the caller to
  read (phase 3's `uniform`, `shuffled` ...), else they are an error. Raises app.UsageError
  naming the label and what is allowed."""
  match = _LABEL.match(label.strip())
  if not match:
    raise app.UsageError(f'Bad method label {label!r}: write a method name, optionally with '
                         "[field=value,...], e.g. 'snapkv[position_mode=cache_relative]'.")
  fields, rest = {}, []
  for part in _parts(match.group(2)) if match.group(2) else []:
    if bare and '=' not in part:
      rest.append(part)
      continue
    name, _, value = part.partition('=')
    name = FIELD_ALIASES.get(name.strip(), name.strip())
    if not value or name not in SPEC_FIELDS:
      raise app.UsageError(
          f'Bad part {part!r} of {label!r}: write field=value with a field of '
          f'{", ".join(sorted(set(SPEC_FIELDS) | set(FIELD_ALIASES)))}.')
    default = getattr(methods_lib.MethodSpec('headaware', 1), name)
    kind = type(default) if default is not None else (float if name == 'staging' else int)
    try:
      fields[name] = kind(value)
    except ValueError:
      raise app.UsageError(f'Bad value in {part!r} of {label!r}: expected '
                           f'{kind.__name__}.') from None
  return match.group(1), fields, rest


def method_spec(label: str, budget: int, kv_bits: str) -> methods_lib.MethodSpec:
  """The MethodSpec of a label at ``budget`` (0 for full) and ``kv_bits`` unless the label
  sets them, its policy and knobs validated; a bad label or value is an app.UsageError."""
  name, fields, _ = parse_method_label(label)
  try:
    spec = methods_lib.MethodSpec(name, 0 if name == 'full' else budget,
                                  **{'kv_bits': kv_bits, **fields})
    spec.policy()  # validates the policy and its knobs
  except ValueError as e:
    raise app.UsageError(f'Method {label!r}: {e}') from e
  return spec
