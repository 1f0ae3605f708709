"""``kvjax replay`` as a function: table, --json, --plot, bad input."""

import json
import os

import pytest

from kvjax.cli import UsageError
from kvjax.policies import make_params
from kvjax.sim import cli, simulator, traces
from kvjax.sim.arc import HOST_POLICIES

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
  assert set(cli.BYTES_PER_PAGE) == set(simulator.POLICIES) | set(HOST_POLICIES)


def test_capacity_within_the_limit_is_accepted():
  # the conversation trace's largest table capacity (65,536) with the costliest policy
  cli.check_capacities([65536], ["autoclass"])


@pytest.mark.skipif(not os.path.exists(REAL), reason=f"real trace not present at {REAL}")
def test_real_trace_replay_matches_published_lru(capsys):
  assert cli.main([REAL, "--capacity", "1024", "--policy", "lru", "--json"]) == 0
  ratio = json.loads(capsys.readouterr().out)["hit_ratio"]["lru"]["1024"]
  assert ratio == pytest.approx(0.045, abs=0.001)  # SOURCES.md: .045 for LRU at 1,024 blocks


# ---------------------------------------------------------------- --param


def _json(capsys, argv):
  assert cli.main(argv + ["--json"]) == 0
  return json.loads(capsys.readouterr().out)


def test_param_reaches_the_simulator(capsys):
  t = traces.generate(150, seed=5)
  base = ["generated:150:5", "--capacity", "24", "--policy", "lru,lfu"]
  out = _json(capsys, base + ["--param", "half_life=20"])
  want = simulator.simulate(t, [24], "lfu", make_params("lfu", half_life=20.0))[24]
  assert out["hit_ratio"]["lfu"]["24"] == want
  assert out["params"] == {"lfu": {"half_life": 20.0}}  # lru has no half_life: untouched
  assert out["hit_ratio"]["lru"]["24"] == simulator.simulate(t, [24], "lru")[24]
  default = _json(capsys, base)["hit_ratio"]["lfu"]["24"]
  assert default == simulator.simulate(t, [24], "lfu")[24] and default != want


def test_param_with_policy_prefix_sets_only_that_policy(capsys):
  t = traces.generate(150, seed=5)
  # both lfu and lecar have half_life; the prefix picks one
  out = _json(capsys, ["generated:150:5", "--capacity", "24", "--policy", "lfu,lecar",
                       "--param", "lfu.half_life=20"])
  assert out["params"] == {"lfu": {"half_life": 20.0}}
  assert out["hit_ratio"]["lfu"]["24"] == simulator.simulate(
      t, [24], "lfu", make_params("lfu", half_life=20.0))[24]
  assert out["hit_ratio"]["lecar"]["24"] == simulator.simulate(t, [24], "lecar")[24]


@pytest.mark.parametrize("param, match", [
    ("half_life", "expected NAME=VALUE"),
    ("half_life=abc", "half_life: expected a number, got 'abc'"),
    ("half_life=nan", "half_life: expected a finite number"),
    ("halflife=3", "unknown parameter 'halflife' .*lfu: half_life"),
    ("lecar.learning_rate=1", "lecar.learning_rate: policy 'lecar' is not in --policy"),
    ("half_life=-5", "policy 'lfu': parameter half_life must be in .*got -5.0"),
])
def test_bad_param_raises_naming_it(param, match):
  with pytest.raises(UsageError, match="argument --param: " + match):
    cli.main(["generated:20", "--capacity", "8", "--policy", "lru,lfu", "--param", param])


def test_param_given_twice_raises():
  with pytest.raises(UsageError, match="half_life given twice for policy lfu"):
    cli.main(["generated:20", "--capacity", "8", "--policy", "lfu", "--param", "half_life=4",
              "--param", "lfu.half_life=5"])


def test_bad_param_exits_2_through_the_command(capsys):
  from kvjax.cli import main as kvjax_main
  assert kvjax_main(["replay", "generated:20", "--capacity", "8", "--policy", "lfu",
                     "--param", "nope=1"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("kvjax: error: argument --param: unknown parameter 'nope'")


def test_arc_replays_through_the_cli(capsys):
  t = traces.generate(150, seed=5)
  out = _json(capsys, ["generated:150:5", "--capacity", "24,60", "--policy", "arc,arc-bypass"])
  for p in ("arc", "arc-bypass"):
    hits = simulator.simulate_hits(t, [24, 60], p)
    assert out["hit_ratio"][p] == {"24": float(hits[0].mean()), "60": float(hits[1].mean())}
  with pytest.raises(UsageError, match="unknown parameter 'credit'.*arc: \\(none\\)"):
    cli.main(["generated:20", "--capacity", "8", "--policy", "arc", "--param", "credit=1"])
