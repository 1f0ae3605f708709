"""``kvjax replay`` as a function: table, --json, --plot, bad input."""

import json

import pytest

from kvjax.sim import cli, simulator, traces


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
  with pytest.raises(ValueError, match="capacity"):
    cli.main(["generated:20", "--capacity", caps, "--policy", "lru"])


def test_unknown_policy_raises():
  with pytest.raises(ValueError, match="policy"):
    cli.main(["generated:20", "--capacity", "8", "--policy", "lru,belady"])


def test_malformed_trace_names_line(tmp_path):
  p = tmp_path / "bad.jsonl"
  p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{oops\n')
  with pytest.raises(ValueError, match=f"{p}:2"):
    cli.main([str(p), "--capacity", "8"])
