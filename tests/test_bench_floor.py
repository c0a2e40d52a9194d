"""experiments.bench_floor: the memory floor's arithmetic, the child's result line, the table."""

import json

import pytest

from experiments import bench_floor
from models.config import LlamaConfig
from models.llama import Llama


def _row(method="full", cache_bytes=2**20, decode=10.0):
  return dict(method=method, param_bytes=3 * 2**20, cache_bytes=cache_bytes,
              decode_ms_per_token=decode, full_bf16_kv_bytes=4 * 2**20, effective_bits=16.0,
              prefill_cache_bytes=2 * 2**20, peak_rss_bytes=100 * 2**20, prefill_s=1.5,
              accuracy=1.0)


def test_floor_is_bytes_read_over_bandwidth():
  # 3 MB of weights + 1 MB of cache at 4 MB/s: one second per step.
  assert bench_floor.floor_ms_per_token(3 * 2**20, 2**20, 4 * 2**20) == pytest.approx(1e3)
  row = bench_floor.with_floor(_row(decode=2500.0), 4 * 2**20)
  assert row["floor_ms_per_token"] == pytest.approx(1e3)
  assert row["decode_over_floor"] == pytest.approx(2.5)
  assert bench_floor.with_floor(_row(decode=None), 1e9)["decode_over_floor"] is None


def test_result_line_round_trips_among_other_output():
  record = _row()
  stdout = "a library's print\nRESULT not this one\n" + bench_floor.result_line(record) + "\n"
  stdout = stdout.replace("RESULT not this one", bench_floor.result_line({"old": 1}))
  assert bench_floor.parse_result(stdout) == record
  assert bench_floor.parse_result("no result\n") is None
  assert json.loads(bench_floor.result_line(record)[len("RESULT "):]) == record


def test_table_and_ratios_vs_full():
  rows = [bench_floor.with_floor(r, 4 * 2**20) for r in
          (_row(decode=2000.0), _row("snapkv", cache_bytes=2**19, decode=1750.0))]
  lines = bench_floor.table(rows)
  assert lines[0].count("|") == lines[2].count("|") == 12
  cells = [c.strip() for c in lines[3].strip("|").split("|")]
  assert cells[0] == "snapkv" and cells[2] == "8.0"  # 4 MB bf16 full / 0.5 MB
  assert cells[8] == "875.0" and cells[9] == "2.0"  # (3 + 0.5) MB / 4 MB/s; 1750 / 875
  (line,) = bench_floor.versus_full(rows)
  assert "2.0x smaller" in line and "decode 1.1x faster" in line and "floors 1.1x" in line
  assert bench_floor.versus_full(rows[1:]) == []


@pytest.mark.parametrize("tied", [True, False])
def test_param_bytes_counts_one_row_of_an_untied_input_table(tied):
  from flax import nnx
  cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=1,
                    num_heads=6, num_kv_heads=2, head_dim=8, tie_word_embeddings=tied)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  layer = 4 * (48 * 48 + 2 * 48 * 16 + 48 * 48 + 3 * 48 * 64 + 2 * 48)  # q k v o, mlp, norms
  embed = 97 * 48 if tied else 48 + 48 * 97  # the tied table; one row + the LM head
  assert bench_floor.param_bytes(model) == layer + 4 * (embed + 48)


def test_probes_are_rates_and_the_floor_takes_the_fastest():
  rates = bench_floor.probe_bandwidths(mib=4, repeats=2)
  assert {"xla_copy", "xla_read", "host_copy"} <= set(rates)  # the tests run on the CPU
  assert min(rates.values()) > 1e6  # bytes/s
  assert bench_floor.floor_bandwidth({"a": 2.0, "b": 5.0}) == 5.0
