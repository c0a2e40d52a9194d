"""Bit schemes (HAQ-KV): what ``--kv_bits`` means, and the per-KV-head bits it gives.

A scheme is parsed from text once (:func:`parse_kv_bits`) and turned into a
``[layers, Hkv, 2]`` int32 array of (key bits, value bits) per KV head
(:func:`allocate_bits`) when a cache is made::

    scheme = parse_kv_bits("roles")                     # retrieval 8/4, induction 4/2, local 4/2
    bits = allocate_bits(scheme, 30, 3, profile=profile)  # [30, 3, 2]
    bits_label(bits)                                    # "mixed"

Accepted texts (case-insensitive, whitespace ignored):

=====================  ===============================================================
``16`` ``8`` ``4`` ``2``  every head, keys and values at that width (16 = the cache dtype)
``K/V``  e.g. ``4/2``  every head: keys K bits, values V bits (V <= K)
``kivi2``              2/2 everywhere with a 128-token full-precision residual (KIVI-2)
``roles``              by head role: retrieval 8/4, induction 4/2, local 4/2; scales per
                       64 channels, a 16-token residual (see below)
``roles:R,I,L``        an explicit role table, e.g. ``roles:8/8,4/2,2/2`` (``8`` = ``8/8``)
``avg:T`` / ``avg=T``  a target average of (key + value) / 2 bits, spent on the heads of
                       highest retrieval-reasoning score (see :func:`allocate_bits`)
``X@group=G,residual=R,fp_sinks=F``  scheme ``X`` with ``G`` channels per scale + zero, an
                       ``R``-token full-precision residual and ``F`` full-precision first
                       tokens (any of the options alone; e.g. ``4/2@group=64``)
=====================  ===============================================================

Widths are those of :data:`headkv_jax.quantization.SUPPORTED_BITS`; keys never get fewer bits
than values (keys are the more sensitive side: KIVI, KVTuner). Every scheme keeps a recent
residual window of ``residual`` tokens per head in full precision (32; KIVI-2: 128), and its
first ``fp_sinks`` tokens too (:data:`headkv_jax.paged_cache.FP_SINKS`, 4), and stores
one float16 scale + zero per token and group of ``group`` channels (32, capped at the head
dimension). Role tables (``roles``, ``roles:R,I,L``) store with :data:`ROLES_GROUP` channels
per scale and a :data:`ROLES_RESIDUAL`-token residual, the storage that takes ``roles`` past
60x fewer bytes than a bfloat16 full cache at 20,000 tokens and budget 1,024 (README). The
``@`` options change either; where they differ from the scheme's defaults they are part of
its canonical text, so cells that differ in them are different methods in the records.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from headkv_jax import fp_window
from headkv_jax import head_scores
from headkv_jax.profile import HeadProfile
from headkv_jax.quantization import SUPPORTED_BITS

KINDS = ("uniform", "kivi2", "roles", "avg")
DEFAULT_RESIDUAL = fp_window.RESIDUAL  # full-precision recent tokens per head
DEFAULT_SINKS = fp_window.SINKS  # full-precision first tokens per head
KIVI_RESIDUAL = 128  # KIVI's R
# Role tables' storage: one scale + zero per 64 channels (a whole SmolLM2 head) and a 16-token
# residual. On niah_single, seed 1, 20 samples, one-shot, with the default table (2k/128,
# 2k/256, 4k/128, 4k/256) this scored 20, 15, 13, 13 (group 32 + residual 32: 19, 16, 13, 11;
# 16-bit pages: 20, 17, 13, 12); at 2k/256 group 64 alone scored 16, residual 16 alone 15,
# group 64 + residual 20 15 (and 20 at 2k/128). Streamed perplexity at 4k, budget 256: 10.734
# (16-bit 10.513, +2.1%; group 32 + residual 32: 10.636). The 4 full-precision first tokens
# stay: without them (fp_sinks=0) the needle cells scored 19, 16, 13, 12 but perplexity rose
# to 11.52 (+9.6%); without the residual (residual=0) 2k/128 and 2k/256 fell to 17 and 14.
ROLES_GROUP = 64
ROLES_RESIDUAL = 16
# (retrieval, induction, local), each (k, v): keys a width above values where they can be (the
# sensitive side). Local heads get 4/2, not 2/2: the profile calls 85 of SmolLM2's 90 KV heads
# local, and head-aware budgets give several of them hundreds of tokens, so they hold most
# quantized tokens. On niah_single, seed 1, 20 samples (16-bit pages: 20, 17, 13, 12 at
# 2k/128, 2k/256, 4k/128, 4k/256) this table scored 19, 16, 13, 11; local 2/2 scored 17, 14,
# 12, 9 for ~12% fewer bytes (roles:8/4,4/2,2/2).
DEFAULT_ROLE_BITS = ((8, 4), (4, 2), (4, 2))
# The classes an ``avg:`` target climbs, cheapest first; (k + v) / 2 = 2, 3, 4, 6, 8, 16.
AVG_LADDER = ((2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 16))
AVG_SCORE = "retrieval_reasoning"  # the profile score an ``avg:`` target follows
FORMS = ("16", "8", "4", "2", "K/V (e.g. 4/2)", "kivi2", "roles", "roles:8/8,4/2,2/2",
         "avg:3.5")
_ALLOWED = f"allowed: {', '.join(FORMS)}"
_PAIR = re.compile(r"^(\d+)(?:/(\d+))?$")
_AVG = re.compile(r"^avg[:=](.+)$")
OPTIONS = ("group", "residual", "fp_sinks")  # the ``@`` options of a scheme text


@dataclasses.dataclass(frozen=True)
class BitScheme:
  """A parsed ``--kv_bits``: how many bits each KV head stores its keys and values in.

  Attributes:
    text: the canonical text (``parse_kv_bits(text) == self``).
    kind: one of :data:`KINDS`.
    key_bits, value_bits: every head's widths (``uniform``, ``kivi2``).
    role_bits: ``roles``: (k, v) of (retrieval, induction, local) heads, indexed by
      :class:`headkv_jax.head_scores.Role`.
    target: ``avg``: the target average of (key + value) / 2 bits, in [2, 16].
    residual: full-precision recent tokens per head (KIVI's R).
    group: channels per scale + zero of a quantized token (capped at the head dimension);
      None: the cache's default (32).
    fp_sinks: first tokens per head kept in full precision beside their codes (not the
      policy's ``sinks``, which are never evicted).
  """

  text: str
  kind: str
  key_bits: int = 16
  value_bits: int = 16
  role_bits: tuple = DEFAULT_ROLE_BITS
  target: float | None = None
  residual: int = DEFAULT_RESIDUAL
  group: int | None = None
  fp_sinks: int = DEFAULT_SINKS

  @property
  def needs_profile(self) -> bool:
    """Whether :func:`allocate_bits` needs a head profile for this scheme."""
    return self.kind in ("roles", "avg")

  @property
  def is_full_precision(self) -> bool:
    """True for ``16`` (nothing is quantized)."""
    return self.kind == "uniform" and self.key_bits == self.value_bits == 16


def _check_pair(key_bits: int, value_bits: int, text: str) -> tuple[int, int]:
  for what, bits in (("key", key_bits), ("value", value_bits)):
    if bits not in SUPPORTED_BITS:
      raise ValueError(f"kv_bits {text!r}: {what} bits {bits} not supported; allowed widths: "
                       f"{', '.join(map(str, SUPPORTED_BITS))}.")
  if value_bits > key_bits:
    raise ValueError(f"kv_bits {text!r}: values get more bits ({value_bits}) than keys "
                     f"({key_bits}); keys are the sensitive side, so K >= V is required "
                     f"(e.g. {value_bits}/{key_bits}).")
  return key_bits, value_bits


def _pair(part: str, text: str) -> tuple[int, int]:
  """``'4/2'`` -> (4, 2); ``'8'`` -> (8, 8)."""
  match = _PAIR.match(part)
  if not match:
    raise ValueError(f"Cannot parse kv_bits {text!r} (at {part!r}); {_ALLOWED}.")
  key_bits = int(match.group(1))
  value_bits = key_bits if match.group(2) is None else int(match.group(2))
  return _check_pair(key_bits, value_bits, text)


def _pair_text(pair) -> str:
  k, v = pair
  return str(k) if k == v else f"{k}/{v}"


def parse_kv_bits(text: str) -> BitScheme:
  """The :class:`BitScheme` of a ``--kv_bits`` text (forms: see the module docstring).

  A :class:`BitScheme` passes through unchanged.

  Raises:
    ValueError: naming the text and the allowed forms, for widths outside
      :data:`SUPPORTED_BITS`, values wider than keys, an unparseable text, or an ``avg``
      target outside [2, 16].
  """
  if isinstance(text, BitScheme):
    return text
  if not isinstance(text, str):
    raise ValueError(f"kv_bits must be text, got {text!r}; {_ALLOWED}.")
  t = re.sub(r"\s+", "", text).lower()
  base, at, tail = t.partition("@")
  scheme = _parse_base(base, text)
  if not at:
    return scheme
  options = _parse_options(tail, text)
  if scheme.is_full_precision:
    raise ValueError(f"kv_bits {text!r}: 16-bit storage quantizes nothing, so it takes no "
                     f"@ options ({', '.join(OPTIONS)}).")
  changed = [k for k in OPTIONS if k in options and options[k] != getattr(scheme, k)]
  if not changed:  # the scheme's own storage: its plain text is canonical
    return scheme
  scheme = dataclasses.replace(scheme, **options)
  opts = [f"{k}={getattr(scheme, k)}" for k in changed]
  return dataclasses.replace(scheme, text=f"{scheme.text}@{','.join(opts)}")


def _parse_options(tail: str, text: str) -> dict:
  """``'group=64,residual=16,fp_sinks=0'`` -> ``{'group': 64, 'residual': 16, 'fp_sinks': 0}``."""
  out = {}
  for part in tail.split(","):
    name, eq, value = part.partition("=")
    if name not in OPTIONS or not eq or not value.isdigit() or name in out:
      raise ValueError(f"kv_bits {text!r}: cannot parse option {part!r}; after '@' give "
                       f"{' and/or '.join(n + '=<int>' for n in OPTIONS)} once each, e.g. "
                       f"roles@group=64,residual=16,fp_sinks=4.")
    out[name] = int(value)
  if "group" in out and out["group"] < 1:
    raise ValueError(f"kv_bits {text!r}: group={out['group']} must be >= 1 (channels per "
                     "scale; it must also divide the model's head_dim).")
  return out


def _parse_base(t: str, text: str) -> BitScheme:
  """The scheme of ``t``, a lower-cased text without ``@`` options."""
  if t == "kivi2":
    return BitScheme("kivi2", "kivi2", 2, 2, residual=KIVI_RESIDUAL)
  storage = dict(residual=ROLES_RESIDUAL, group=ROLES_GROUP)
  if t == "roles":
    return BitScheme("roles", "roles", **storage)
  if t.startswith("roles:"):
    parts = t[len("roles:"):].split(",")
    if len(parts) != len(head_scores.Role):
      raise ValueError(f"kv_bits {text!r}: a role table needs {len(head_scores.Role)} entries "
                       f"({', '.join(head_scores.ROLE_NAMES)}), e.g. roles:8/8,4/2,2/2; got "
                       f"{len(parts)}.")
    table = tuple(_pair(p, text) for p in parts)
    canonical = ("roles" if table == DEFAULT_ROLE_BITS
                 else "roles:" + ",".join(_pair_text(p) for p in table))
    return BitScheme(canonical, "roles", role_bits=table, **storage)
  match = _AVG.match(t)
  if match:
    try:
      target = float(match.group(1))
    except ValueError:
      raise ValueError(f"kv_bits {text!r}: the avg target must be a number, e.g. avg:3.5."
                       ) from None
    lo, hi = sum(AVG_LADDER[0]) / 2, sum(AVG_LADDER[-1]) / 2
    if not lo <= target <= hi:  # also refuses NaN
      raise ValueError(f"kv_bits {text!r}: avg target {target:g} outside [{lo:g}, {hi:g}] "
                       f"(the cheapest class {_pair_text(AVG_LADDER[0])} to the dearest "
                       f"{_pair_text(AVG_LADDER[-1])}).")
    return BitScheme(f"avg:{target:g}", "avg", target=target)
  key_bits, value_bits = _pair(t, text)
  return BitScheme(_pair_text((key_bits, value_bits)), "uniform", key_bits, value_bits)


def _check_weights(weights, shape: tuple[int, int]) -> np.ndarray | None:
  if weights is None:
    return None
  w = np.asarray(weights, dtype=np.float64)
  if w.shape != shape:
    raise ValueError(f"weights have shape {w.shape}; expected [num_layers, num_kv_heads] = "
                     f"{shape}.")
  if not np.isfinite(w).all() or (w < 0).any():
    bad = w[~np.isfinite(w) | (w < 0)].reshape(-1)[0]
    raise ValueError(f"weights must be finite and >= 0 (e.g. per-head token budgets); got "
                     f"{bad:g}.")
  if w.sum() <= 0:
    raise ValueError("weights sum to 0; give at least one head a positive weight.")
  return w


def _check_profile(profile: HeadProfile | None, scheme: BitScheme, num_layers: int,
                   num_kv_heads: int) -> HeadProfile:
  if profile is None:
    raise ValueError(f"kv_bits {scheme.text!r} needs a head profile (roles / scores); see "
                     "`python -m experiments.profile_heads`.")
  profile.check_matches(profile.model_id, num_layers, num_kv_heads)
  return profile


def _avg_bits(target: float, score: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
  """``[layers, Hkv, 2]`` of the ``avg`` scheme (see :func:`allocate_bits`)."""
  shape = score.shape
  n = score.size
  w = np.ones(n) if weights is None else weights.reshape(-1)
  # Integer units: a class costs (k + v) per unit weight; the target is 2 * target * sum(w).
  cost = np.array([k + v for k, v in AVG_LADDER], np.float64)
  allowed = 2.0 * target * w.sum()
  tol = 1e-9 * max(allowed, 1.0)
  order = sorted(range(n), key=lambda i: (-score.reshape(-1)[i], i))
  level = np.zeros(n, np.int64)
  spent = cost[0] * w.sum()
  cap = len(AVG_LADDER) - 1
  for i in order:
    while level[i] < cap:
      step = (cost[level[i] + 1] - cost[level[i]]) * w[i]
      if spent + step > allowed + tol:
        break
      spent += step
      level[i] += 1
    cap = int(level[i])  # no lower-scoring head gets more bits than this one
  return np.asarray(AVG_LADDER, np.int32)[level].reshape(shape + (2,))


def allocate_bits(scheme: BitScheme | str, num_layers: int, num_kv_heads: int, *,
                  profile: HeadProfile | None = None, weights=None) -> np.ndarray:
  """Per-KV-head (key bits, value bits) of a scheme -> int32 ``[num_layers, num_kv_heads, 2]``.

  - ``uniform`` / ``kivi2``: every head the scheme's widths.
  - ``roles``: each head the ``role_bits`` entry of its ``profile.roles`` value
    (:class:`~headkv_jax.head_scores.Role`: retrieval 0, induction 1, local 2).
  - ``avg``: a greedy fill of a bit budget, in three steps.

    1. Every head starts at the cheapest class of :data:`AVG_LADDER`, (2, 2); the ladder is
       (2,2) -> (4,2) -> (4,4) -> (8,4) -> (8,8) -> (16,16).
    2. Heads are visited once each, from the highest ``profile.scores['retrieval_reasoning']``
       down (ties: the lower flat index ``layer * num_kv_heads + head`` first). Each climbs
       the ladder one class at a time while the weighted average of (k + v) / 2 over all
       heads, ``sum(w * (k + v) / 2) / sum(w)``, stays <= ``scheme.target``, but never past
       the class of the head visited before it.
    3. So the bits go to the best-scoring heads first (a few heads in full precision rather
       than every head one step up), a higher-scoring head never has fewer bits than a
       lower-scoring one, and with equal weights no single head can go one class up without
       passing the target (with unequal weights: none can without also breaking that order).

    ``weights`` (``[num_layers, num_kv_heads]``, >= 0, e.g. the per-head token budgets)
    make the average one over stored tokens; None weighs every head the same.

  Raises:
    ValueError: an unparseable ``scheme`` text; ``roles`` / ``avg`` without a profile or with
      one of another shape; ``weights`` of another shape, negative or all zero.
  """
  scheme = parse_kv_bits(scheme)
  shape = (int(num_layers), int(num_kv_heads))
  if min(shape) < 1:
    raise ValueError(f"num_layers and num_kv_heads must be >= 1; got {shape}.")
  weights = _check_weights(weights, shape)
  if scheme.kind in ("uniform", "kivi2"):
    out = np.empty(shape + (2,), np.int32)
    out[...] = (scheme.key_bits, scheme.value_bits)
    return out
  profile = _check_profile(profile, scheme, *shape)
  if scheme.kind == "roles":
    table = np.asarray(scheme.role_bits, np.int32)  # [roles, 2]
    return table[np.asarray(profile.roles, np.int64)]
  return _avg_bits(scheme.target, np.asarray(profile.scores[AVG_SCORE], np.float64), weights)


def mean_bits(bits, weights=None) -> float:
  """The (weighted) average of (key + value) / 2 nominal bits of ``bits [layers, Hkv, 2]``."""
  bits = np.asarray(bits, np.float64)
  if bits.ndim != 3 or bits.shape[-1] != 2:
    raise ValueError(f"bits must be [layers, Hkv, 2]; got shape {bits.shape}.")
  w = _check_weights(weights, bits.shape[:2])
  per_head = bits.sum(-1) / 2
  return float(per_head.mean() if w is None else (per_head * w).sum() / w.sum())


def bits_label(bits) -> str:
  """Short text for records: ``"16/16"``, ``"4/2"`` when every head agrees, else ``"mixed"``.

  Args:
    bits: ``[layers, Hkv, 2]`` (key, value) bits, e.g. from :func:`allocate_bits`.
  """
  bits = np.asarray(bits)
  if bits.ndim != 3 or bits.shape[-1] != 2 or bits.size == 0:
    raise ValueError(f"bits must be a non-empty [layers, Hkv, 2]; got shape {bits.shape}.")
  pairs = {(int(k), int(v)) for k, v in bits.reshape(-1, 2)}
  if len(pairs) > 1:
    return "mixed"
  (k, v), = pairs
  return f"{k}/{v}"


__all__ = ["KINDS", "DEFAULT_RESIDUAL", "DEFAULT_SINKS", "KIVI_RESIDUAL", "ROLES_GROUP",
           "ROLES_RESIDUAL", "DEFAULT_ROLE_BITS", "AVG_LADDER", "AVG_SCORE", "FORMS", "BitScheme",
           "parse_kv_bits", "allocate_bits", "mean_bits", "bits_label"]
