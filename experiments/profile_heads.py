r"""Profile a model's heads and save the HeadProfile JSON + heatmap PNG.

  python -m experiments.profile_heads --model=smollm2-135m \
      --output=headkv_jax/profiles/smollm2-135m.json --num_probes=24 --seed=0

See ``experiments/profiling.py`` for what is probed and scored.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags

from experiments import cli
from experiments.profiling import ProbeSettings, profile_model, summarize
from headkv_jax import profile as profile_lib


def _ints(values: Sequence[str]) -> tuple[int, ...]:
  return tuple(int(v) for v in values)


_D = ProbeSettings()
_MODEL = flags.DEFINE_string('model', 'smollm2-135m', 'Alias, HF directory or .gguf file.')
_OUTPUT = flags.DEFINE_string('output', None,
                              'Profile JSON path (the heatmap PNG goes beside it).')
_NUM_PROBES = flags.DEFINE_integer('num_probes', _D.num_probes, 'Probes of each kind.')
_SEED = flags.DEFINE_integer('seed', _D.seed, 'Seed of every probe.')
_LENGTHS = flags.DEFINE_list('lengths', [str(n) for n in _D.lengths],
                             'Needle / reasoning / text probe lengths (tokens).')
_INDUCTION_LENGTHS = flags.DEFINE_list('induction_lengths',
                                       [str(n) for n in _D.induction_lengths],
                                       'Induction probe lengths (tokens).')
_DEPTHS = flags.DEFINE_list('depths', [str(d) for d in _D.depths],
                            'Needle / answer depths in [0, 1].')
_WINDOW = flags.DEFINE_integer('window', _D.window, 'Local score window (keys).')
_TOP_N = flags.DEFINE_integer('top_n', _D.top_n, 'Retrieval-reasoning top-N keys per row.')
_ANSWER_ROWS = flags.DEFINE_integer('answer_rows', _D.answer_rows,
                                    'Rows recorded at the end of needle / reasoning probes.')
_LOCAL_ROWS = flags.DEFINE_integer('local_rows', _D.local_rows,
                                   'Rows recorded at the end of text probes.')
_REQUIRE_COPY = flags.DEFINE_bool('require_copy', _D.require_copy,
                                  'Retrieval counts only answer tokens the model predicts.')


def main(argv):
  del argv
  from models.loading import load_model  # pylint: disable=g-import-not-at-top
  from models.runner import ModelRunner  # pylint: disable=g-import-not-at-top

  settings = ProbeSettings(
      num_probes=_NUM_PROBES.value, seed=_SEED.value, lengths=_ints(_LENGTHS.value),
      induction_lengths=_ints(_INDUCTION_LENGTHS.value),
      depths=tuple(float(d) for d in _DEPTHS.value), window=_WINDOW.value,
      top_n=_TOP_N.value, answer_rows=_ANSWER_ROWS.value, local_rows=_LOCAL_ROWS.value,
      require_copy=_REQUIRE_COPY.value)
  model, tokenizer = load_model(_MODEL.value)
  profile = profile_model(ModelRunner(model), tokenizer, _MODEL.value, settings)
  profile.save(_OUTPUT.value)
  png = os.path.splitext(_OUTPUT.value)[0] + '.png'
  profile_lib.plot_heatmaps(profile, png)
  print(summarize(profile))
  print(f'needle copy rate {profile.probe_settings["needle_copy_rate"]:.2f}; '
        f'{profile.probe_settings["seconds"]} s; wrote {_OUTPUT.value} and {png}')


if __name__ == '__main__':
  flags.mark_flag_as_required('output')
  cli.run(main)
