"""``kvjax replay`` as a function: table, --json, --plot, bad input."""

import json
import os

import pytest

from kvjax.cli import UsageError
from kvjax.sim import cli, simulator, traces

REAL = traces.default_trace_path()


def test_json_output_matches_simulator(capsys):
  assert cli.main(["replay", "generated:120:4", "--capacity", "16,64", "--policy", "lru,min",
                   "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  t = traces.generate(120, seed=4)
  for p in ("lru", "min"):
    want = simulator.simulate(t, [16, 64], p)
    assert out["hit_ratio"][p] == {str(c): r for c, r in want.items()}
  assert list(out) == ["hit_ratio"]


def test_table_plot_and_prefix_accounting(tmp_path, capsys):
  png = tmp_path / "p.png"
  cli.main(["generated:80:1", "--capacity", "8,32", "--policy", "lru,freqlru", "--plot",
            str(png), "--accounting", "prefix"])
  out = capsys.readouterr().out
  assert "freqlru" in out and "prefix accounting" in out
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("caps", ["0", "16,0", "-4", "x"])
def test_bad_capacity_raises(caps):
  with pytest.raises(UsageError, match="argument --capacity"):
    cli.main(["generated:20", "--capacity", caps, "--policy", "lru"])


def test_unknown_policy_raises():
  with pytest.raises(UsageError, match="argument --policy: unknown policy 'belady'"):
    cli.main(["generated:20", "--capacity", "8", "--policy", "lru,belady"])


def test_malformed_trace_names_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{oops\n')
  with pytest.raises(traces.TraceError, match=f"{p}:2: malformed JSON") as e:
    cli.main([str(p), "--capacity", "8"])
  assert e.value.path == str(p) and e.value.line == 2


def test_memory_estimate_takes_the_hungriest_run():
  need, c, p = cli.memory_estimate([1024, 65536], ["lru", "autoclass", "min"])
  assert (c, p) == (65536, "autoclass")
  assert need == 65536 * cli.BYTES_PER_PAGE["autoclass"]
  # every registered policy has a measured figure (a new one falls back to the default)
  assert set(cli.BYTES_PER_PAGE) == set(simulator.POLICIES)


def test_capacity_within_the_limit_is_accepted():
  # the conversation trace's largest table capacity (65,536) with the costliest policy
  cli.check_capacities([65536], ["autoclass"])


@pytest.mark.skipif(not os.path.exists(REAL), reason=f"real trace not present at {REAL}")
def test_real_trace_replay_matches_published_lru(capsys):
  assert cli.main([REAL, "--capacity", "1024", "--policy", "lru", "--json"]) == 0
  ratio = json.loads(capsys.readouterr().out)["hit_ratio"]["lru"]["1024"]
  assert ratio == pytest.approx(0.045, abs=0.001)  # SOURCES.md: .045 for LRU at 1,024 blocks
