"""The CLI's persistent compilation cache: a second run loads what the first compiled."""

import os
import subprocess
import sys

from kvjax import cliutil


def _replay(cache_dir, tmp_path):
  env = dict(os.environ, KVJAX_COMPILE_CACHE=str(cache_dir))
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)   # the CLI's default: store all
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "kvjax", "replay", "generated:200:1", "--capacity",
                      "64", "--policy", "lru"], env=env, cwd=tmp_path, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  return r.stdout


def test_second_run_reuses_the_first_runs_executables(tmp_path):
  cache_dir = tmp_path / "xla"
  first = _replay(cache_dir, tmp_path)
  entries = sorted(os.listdir(cache_dir))
  assert entries, "the first run stored nothing"
  mtimes = {e: os.stat(cache_dir / e).st_mtime_ns for e in entries}
  second = _replay(cache_dir, tmp_path)
  assert second == first
  # nothing new compiled: the same entries, none rewritten
  assert sorted(os.listdir(cache_dir)) == entries
  assert {e: os.stat(cache_dir / e).st_mtime_ns for e in entries} == mtimes


def test_cache_dir_from_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_COMPILE_CACHE", "off")
  assert cliutil.compile_cache_dir() is None
  assert cliutil.enable_compile_cache() is None
  monkeypatch.setenv("KVJAX_COMPILE_CACHE", str(tmp_path / "c"))
  assert cliutil.compile_cache_dir() == str(tmp_path / "c")
  monkeypatch.delenv("KVJAX_COMPILE_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert cliutil.compile_cache_dir() == os.path.join(str(tmp_path), "kvjax", "xla")
