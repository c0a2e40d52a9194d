"""Head profiling: probe prompts -> attention maps -> scores -> a HeadProfile.

The library half of ``python -m experiments.profile_heads`` (see that binary for the
command). Runs probes of each kind from ``experiments/probes.py`` (teacher forced: the answer
is already the end of every probe, so one forward pass per probe is enough):

- needle probes (formats x depths x lengths) -> retrieval score (Wu et al.), counting only
  the answer tokens the model itself predicts (``require_copy``);
- reasoning probes (templates x depths x lengths) -> retrieval-reasoning score (HeadKV-R2);
- induction probes (repeated random tokens) -> induction score;
- text probes (natural prose) -> local score.

Only the query rows a score reads are recorded (``models/attention_maps.py``). Scores are
averaged over probes and folded into KV heads (``headkv_jax.profile.build_profile``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments import probes as probes_lib
from headkv_jax import head_scores
from headkv_jax import profile as profile_lib

_KIND_SEED = {'needle': 1, 'reasoning': 2, 'induction': 3, 'text': 4}  # per-kind seed offset


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """How a profile is measured (saved in the profile's ``probe_settings``).

  Attributes:
    num_probes: probes of each kind (needle, reasoning, induction, text).
    seed: every probe's seed derives from it.
    lengths: token lengths cycled through by needle, reasoning and text probes.
    induction_lengths: token lengths of induction probes (their second copy is recorded in
      full, so memory grows with length^2: keep these short).
    depths: needle / answer depths cycled through.
    window: keys counted as local by the local score.
    top_n: keys per row counted by the retrieval-reasoning score.
    answer_rows: query rows recorded at the end of needle / reasoning probes (must cover
      the answer).
    local_rows: query rows recorded at the end of text probes.
    require_copy: retrieval counts only answer tokens the model predicts itself (Wu et al.).
  """

  num_probes: int = 24
  seed: int = 0
  lengths: tuple[int, ...] = (512, 768, 1024)
  induction_lengths: tuple[int, ...] = (256, 512)
  depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
  window: int = 64
  top_n: int = 10
  answer_rows: int = 32
  local_rows: int = 128
  require_copy: bool = True

  def __post_init__(self):
    for name in ('num_probes', 'window', 'top_n', 'answer_rows', 'local_rows'):
      if int(getattr(self, name)) < 1:
        raise ValueError(f'{name} must be >= 1. Got {getattr(self, name)}.')
    for name in ('lengths', 'induction_lengths', 'depths'):
      if not getattr(self, name):
        raise ValueError(f'{name} must not be empty.')
    short = [n for n in self.lengths if n <= self.local_rows + self.window]
    if short:
      raise ValueError(f'lengths {short} are too short: every length must exceed local_rows '
                       f'+ window = {self.local_rows + self.window}.')


def make_probes(tokenizer, settings: ProbeSettings) -> list[tuple[str, object]]:
  """``(kind, probe)`` pairs: ``num_probes`` of each kind, grid cells cycled, seeded.

  Grid coordinates cycle with different periods (format 4, length 3, depth 5 ...) so a
  few probes already cover every format, length and depth.
  """
  s = settings
  out = []

  def seed(kind, i):
    return s.seed * 1_000_003 + _KIND_SEED[kind] * 10_007 + i

  def pick(values, i):
    return values[i % len(values)]

  for i in range(s.num_probes):
    out.append(('needle', probes_lib.needle_probe(
        tokenizer, pick(s.lengths, i), needle_format=pick(probes_lib.NEEDLE_FORMATS, i),
        depth=pick(s.depths, i), seed=seed('needle', i))))
  for i in range(s.num_probes):
    out.append(('reasoning', probes_lib.reasoning_probe(
        tokenizer, pick(s.lengths, i), template=pick(probes_lib.REASONING_TEMPLATES, i),
        depth=pick(s.depths, i), seed=seed('reasoning', i))))
  for i in range(s.num_probes):
    out.append(('induction', probes_lib.induction_probe(
        tokenizer, pick(s.induction_lengths, i), seed=seed('induction', i))))
  for i in range(s.num_probes):
    out.append(('text', probes_lib.text_probe(tokenizer, pick(s.lengths, i),
                                              seed=seed('text', i))))
  return out


def _rows_needed(kind: str, probe, settings: ProbeSettings) -> int:
  """How many of the probe's last query rows its score reads (a static shape)."""
  num_tokens = len(probe.tokens)
  if kind in ('needle', 'reasoning'):
    need = num_tokens - probe.query_rows[0]
    if need > settings.answer_rows:
      raise ValueError(f'a {kind} probe answer needs the last {need} rows but answer_rows='
                       f'{settings.answer_rows}; raise answer_rows.')
    return settings.answer_rows
  if kind == 'induction':
    return num_tokens - probe.second_start
  return settings.local_rows


def score_probe(kind: str, probe, attn, top1, settings: ProbeSettings):
  """One probe's ``(score name, [layers, q_heads] scores, copy rate or None)``.

  Args:
    attn: ``[layers, q_heads, R, T]`` maps of the probe's last R rows.
    top1: ``[R]`` the model's top-1 next-token ids at those rows.
  """
  num_tokens = attn.shape[-1]
  if kind == 'needle':
    rows = np.asarray(probe.query_rows)
    answer = np.asarray(probe.tokens[probe.output_span[0]:probe.output_span[1]])
    copied = top1[rows - (num_tokens - attn.shape[2])] == answer  # [S] bool
    score = head_scores.retrieval_score(attn, rows, probe.target_key_pos_padded(),
                                        copied if settings.require_copy else None)
    return 'retrieval', score, float(copied.mean())
  if kind == 'reasoning':
    return 'retrieval_reasoning', head_scores.retrieval_reasoning_score(
        attn, probe.query_rows, probe.answer_span, settings.top_n), None
  if kind == 'induction':
    return 'induction', head_scores.induction_score(
        attn, probe.first_start, probe.second_start, probe.length), None
  if kind == 'text':
    return 'local', head_scores.local_score(attn, settings.window), None
  raise ValueError(f'unknown probe kind {kind!r}; allowed: {list(_KIND_SEED)}.')


def profile_model(runner, tokenizer, model_id: str, settings: ProbeSettings,
                  progress: bool = True) -> profile_lib.HeadProfile:
  """Runs every probe through the model and builds the (KV-head) profile."""
  from models.attention_maps import attention_maps  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  probe_list = make_probes(tokenizer, settings)
  sums = {name: 0.0 for name in profile_lib.SCORE_NAMES}
  counts = {name: 0 for name in profile_lib.SCORE_NAMES}
  copy_rates = []
  for kind, probe in tqdm.tqdm(probe_list, desc='profiling heads', disable=not progress):
    num_rows = _rows_needed(kind, probe, settings)
    maps, top1 = attention_maps(runner, np.asarray([probe.tokens]), num_rows, with_top1=True)
    name, score, copy_rate = score_probe(kind, probe, maps[:, 0], top1[0], settings)
    sums[name] = sums[name] + score  # [layers, q_heads]
    counts[name] += 1
    if copy_rate is not None:
      copy_rates.append(copy_rate)
  q_head_scores = {name: sums[name] / counts[name] for name in profile_lib.SCORE_NAMES}
  recorded = dict(dataclasses.asdict(settings), needle_formats=list(probes_lib.NEEDLE_FORMATS),
                  reasoning_templates=list(probes_lib.REASONING_TEMPLATES),
                  needle_copy_rate=float(np.mean(copy_rates)),
                  seconds=round(time.perf_counter() - start, 1))
  return profile_lib.build_profile(model_id, q_head_scores, runner.config.num_kv_heads,
                                   probe_settings=recorded)


def _ranks(values: np.ndarray) -> np.ndarray:
  """0-based ranks of a flat array; tied values share their average rank."""
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  starts = np.cumsum(counts) - counts  # first rank of each distinct value
  return (starts + (counts - 1) / 2)[inverse]


def spearman(a, b) -> float:
  """Spearman rank correlation of two equal-shape score arrays (ties: average ranks)."""
  a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
  if a.shape != b.shape:
    raise ValueError(f'score shapes differ: {a.shape} vs {b.shape}.')
  ra, rb = _ranks(a.reshape(-1)), _ranks(b.reshape(-1))
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def top_share(scores, fraction: float = 0.1) -> float:
  """Share of the total score held by the top ``fraction`` of heads (at least one head)."""
  flat = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
  if not 0 < fraction <= 1:
    raise ValueError(f'fraction must be in (0, 1]. Got {fraction}.')
  total = flat.sum()
  k = max(1, int(round(fraction * flat.size)))
  return float(flat[:k].sum() / total) if total > 0 else 0.0


def top_heads(profile: profile_lib.HeadProfile, name: str, k: int = 5) -> list[tuple]:
  """The ``k`` best (layer, kv_head, score) of one score, best first."""
  scores = profile.scores[name]
  order = np.argsort(-scores.reshape(-1), kind='stable')[:k]
  return [(int(i // profile.num_kv_heads), int(i % profile.num_kv_heads),
           round(float(scores.reshape(-1)[i]), 4)) for i in order]


def summarize(profile: profile_lib.HeadProfile) -> str:
  """Role counts and the top heads of every score, for a terminal."""
  counts = {name: int((profile.roles == role).sum())
            for role, name in zip(head_scores.Role, head_scores.ROLE_NAMES)}
  lines = [f'{profile.model_id}: roles {counts}']
  for name in profile_lib.SCORE_NAMES:
    lines.append(f'  top {name} (layer, kv_head, score): {top_heads(profile, name)}')
  return '\n'.join(lines)

