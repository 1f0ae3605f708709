"""``kvjax`` on bad input: one line ``kvjax: error: ...`` on stderr, exit 2, before long work."""

import json
import os
import subprocess
import sys
import time

import pytest

from kvjax import cli
from kvjax import cliutil
from kvjax.sim import simulator, traces

GOOD = {"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}
AZURE_CODE = traces.default_trace_path("AzureLLMInferenceTrace_code.csv")


def run(argv, capsys) -> str:
  """``kvjax.cli.main(argv)``: asserts exit 2 and a single traceback-free line; stderr."""
  rc = cli.main(argv)
  captured = capsys.readouterr()
  err = captured.err
  assert rc == 2, (rc, err)
  assert "Traceback" not in err + captured.out
  assert err.startswith("kvjax: error: ") and err.endswith("\n") and err.count("\n") == 1, err
  return err


def write_lines(path, *lines, mode="w"):
  with open(path, mode) as f:
    for line in lines:
      f.write(line if isinstance(line, (str, bytes)) else json.dumps(line))
      f.write("\n" if mode == "w" else b"\n")
  return str(path)


@pytest.fixture
def no_simulation(monkeypatch):
  """Simulating (or loading the trace file) fails the test: errors must come first."""
  def boom(*args, **kwargs):
    raise AssertionError("simulation started before the arguments were checked")

  monkeypatch.setattr(simulator, "simulate", boom)
  monkeypatch.setattr(simulator, "simulate_hits", boom)
  monkeypatch.setattr(traces, "load_mooncake", boom)


def test_empty_trace(tmp_path, capsys):
  p = tmp_path / "empty.jsonl"
  p.write_text("\n\n")
  err = run(["replay", str(p), "--capacity", "8"], capsys)
  assert f"{p}: " in err and "no requests" in err and "nan" not in err


def test_trace_of_zero_length_requests(tmp_path, capsys):
  p = write_lines(tmp_path / "zero.jsonl", *[dict(GOOD, input_length=0, hash_ids=[])] * 3)
  err = run(["replay", p, "--capacity", "8"], capsys)
  assert "3 request(s), all of input_length 0" in err and "nan" not in err


@pytest.mark.parametrize("bad, why", [
    ('{"timestamp": NaN, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}',
     "NaN is not a valid JSON number"),
    ('{"timestamp": 0, "input_length": 600, "output_length": Infinity, "hash_ids": [1, 2]}',
     "Infinity is not a valid JSON number"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 1e400, "hash_ids": [1, 2]}',
     "output_length must be a non-negative integer below 2^63"),
    ('{"timestamp": 1e30, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}',
     "timestamp must be a non-negative integer below 2^63"),
    ('{"timestamp": 0, "input_length": 600, "output_length": %d, "hash_ids": [1, 2]}' % 2 ** 70,
     "output_length must be a non-negative integer below 2^63, got an integer of 71 bits"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, %s]}'
     % ("9" * 5000), "invalid number"),
    ("[" * 100_000, "nested too deeply"),
])
def test_bad_number_names_file_and_line(tmp_path, capsys, bad, why):
  p = write_lines(tmp_path / "t.jsonl", GOOD, bad)
  err = run(["replay", p, "--capacity", "8"], capsys)
  assert f"{p}:2: " in err and why in err
  assert len(err) < 400  # a 5000-digit literal is not echoed back


def test_non_utf8_bytes_name_file_and_line(tmp_path, capsys):
  p = write_lines(tmp_path / "t.jsonl", json.dumps(GOOD).encode(), json.dumps(GOOD).encode(),
                  b'{"timestamp": 0, "note": "\xff\xfe"}', mode="wb")
  err = run(["replay", p, "--capacity", "8"], capsys)
  assert f"{p}:3: not UTF-8" in err


def test_gzip_file_says_so(tmp_path, capsys):
  import gzip

  p = tmp_path / "t.jsonl.gz"
  p.write_bytes(gzip.compress(json.dumps(GOOD).encode()))
  assert "gzip" in run(["replay", str(p), "--capacity", "8"], capsys)


def test_missing_file_and_directory(tmp_path, capsys):
  missing = tmp_path / "nope.jsonl"
  assert f"{missing}: cannot read the trace (No such file" in run(
      ["replay", str(missing), "--capacity", "8"], capsys)
  assert f"{tmp_path}: cannot read the trace (Is a directory" in run(
      ["replay", str(tmp_path), "--capacity", "8"], capsys)


def test_too_large_capacity_fails_fast_with_estimate(capsys, no_simulation):
  t0 = time.perf_counter()
  err = run(["replay", "generated:50", "--capacity", "1024,1000000000", "--policy", "lru"],
            capsys)
  assert time.perf_counter() - t0 < 5.0
  assert "argument --capacity: 1,000,000,000 blocks with policy lru" in err
  assert "GiB of memory (estimate), over the limit of" in err
  limit, _ = cliutil.memory_limit()
  assert limit <= cliutil.MEMORY_CAP and f"limit of {cliutil.gib(limit)}" in err


def test_capacity_past_int32_is_refused(capsys, no_simulation):
  err = run(["replay", "generated:50", "--capacity", str(2 ** 31)], capsys)
  assert "argument --capacity" in err and "int32" in err


@pytest.mark.parametrize("name", ["missing-dir/hit.png", "hit.xyz", "."])
def test_unwritable_plot_path_fails_before_simulation(tmp_path, capsys, no_simulation, name):
  path = str(tmp_path / name)
  err = run(["replay", "generated:50", "--capacity", "8", "--plot", path], capsys)
  assert "argument --plot: " in err


def test_read_only_plot_dir_fails_before_simulation(tmp_path, capsys, no_simulation):
  if os.geteuid() == 0:
    pytest.skip("root writes into read-only directories")
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o500)
  try:
    err = run(["replay", "generated:50", "--capacity", "8", "--plot", str(ro / "p.png")], capsys)
  finally:
    ro.chmod(0o700)
  assert "argument --plot: cannot write" in err


def test_plot_check_leaves_no_file(tmp_path, capsys):
  png = tmp_path / "p.png"
  cli.main(["replay", "generated:30", "--capacity", "8", "--policy", "lru", "--plot", str(png)])
  assert png.read_bytes()[:4] == b"\x89PNG"
  capsys.readouterr()
  # a failing run after the plot check removes what the check created
  err = run(["replay", "generated:0", "--capacity", "8", "--plot", str(tmp_path / "q.png")],
            capsys)
  assert "argument TRACE" in err and not (tmp_path / "q.png").exists()


def test_csv_trace_says_replay_needs_block_hashes(tmp_path, capsys):
  p = tmp_path / "azure.csv"
  p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,4808,10\n")
  err = run(["replay", str(p), "--capacity", "8"], capsys)
  assert f"{p}:1: this looks like a CSV file" in err and "hash_ids" in err
  assert "block hashes" in err


@pytest.mark.skipif(not os.path.exists(AZURE_CODE), reason="shared traces absent")
def test_real_azure_trace_message(capsys):
  err = run(["replay", AZURE_CODE, "--capacity", "8"], capsys)
  assert f"{AZURE_CODE}:1: this looks like a CSV file" in err and "hash_ids" in err


def test_json_without_hash_ids_says_what_replay_needs(tmp_path, capsys):
  p = write_lines(tmp_path / "t.jsonl", {"timestamp": 0, "input_length": 5, "output_length": 1})
  err = run(["replay", p, "--capacity", "8"], capsys)
  assert f"{p}:1: missing field(s) ['hash_ids']" in err and "block hashes" in err


@pytest.mark.parametrize("argv, names", [
    (["replay", "generated:20"], "--capacity"),
    (["replay", "generated:20", "--capacity", "8", "--accounting", "tokens"], "--accounting"),
    (["replay", "generated:20", "--capacity", "8,x"], "--capacity"),
    (["replay", "generated:20", "--capacity", "0"], "--capacity"),
    (["replay", "generated:20", "--capacity", "8", "--policy", "belady"], "--policy"),
    (["replay", "generated:-3", "--capacity", "8"], "TRACE"),
    (["replay", "generated:1:x", "--capacity", "8"], "TRACE"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["demo", "--kv-dtype", "int8"], "--kv-dtype"),
    (["demo", "--page-size", "4096"], "--page-size"),
    (["demo", "--l2-pages", "-1"], "--l2-pages"),
    (["demo", "--l2-pages", "x"], "--l2-pages"),
    (["frobnicate"], "command"),
])
def test_bad_arguments_are_one_line(capsys, no_simulation, argv, names):
  assert names in run(argv, capsys)


def test_programming_errors_keep_their_traceback(monkeypatch):
  # Not user input: a bug inside kvjax is not turned into a one-line message.
  def bug(*args, **kwargs):
    raise RuntimeError("a bug")

  monkeypatch.setattr(simulator, "simulate", bug)
  with pytest.raises(RuntimeError, match="a bug"):
    cli.main(["replay", "generated:20", "--capacity", "8", "--policy", "lru"])


def test_python_dash_m_kvjax(tmp_path):
  p = tmp_path / "t.jsonl"
  p.write_text(json.dumps(GOOD) + "\n" + '{"timestamp": NaN}\n')
  r = subprocess.run([sys.executable, "-m", "kvjax", "replay", str(p), "--capacity", "8"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()]
  assert r.stderr.startswith(f"kvjax: error: {p}:2: ")
