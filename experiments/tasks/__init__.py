"""Offline, seeded task generators for the experiment phases.

  from experiments import tasks
  sample = tasks.make_task('passkey', tokenizer, length=4096, seed=0, index=3)
  sample.prompt_tokens   # exactly 4096 token ids, chat frame and answer prefix included
  sample.score(generated_text)

Tasks: passkey; RULER needles (niah_single, niah_multikey, niah_multivalue, niah_multiquery);
variable_tracking; perplexity over `pydoc_data.topics`; LongBench subsets from local JSONL
files as 'longbench/<subset>' with `longbench_dir=`.
"""

# The registry.
from experiments.tasks._registry import LONGBENCH_PREFIX
from experiments.tasks._registry import make_task
from experiments.tasks._registry import TASKS
# Samples and metrics.
from experiments.tasks._sample import METRICS
from experiments.tasks._sample import qa_f1
from experiments.tasks._sample import Sample
from experiments.tasks._sample import substring_match
# LongBench files.
from experiments.tasks.longbench import load_longbench
