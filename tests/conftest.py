"""Test set-up: 8 host devices (set before jax is imported) so sharding runs on CPU, and
XLA:CPU's LLVM optimizations off (compile time; see below).

XLA compilation is most of the suite's time, and modules compile the same
programs again (each module drops its executables, below; many tests build a
fresh jit of the same function). One persistent compilation cache per test
run, shared by the xdist workers, turns those recompiles into loads: the
process that loads this file first (the xdist controller, or a plain pytest)
makes a temporary folder, names it in ``$KVJAX_TEST_XLA_CACHE`` for the
workers it starts, and removes it at exit. Set ``KVJAX_TEST_XLA_CACHE`` to a
folder yourself to keep the cache across runs, or to ``off``.
"""

import atexit
import os
import shutil
import tempfile

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# LLVM's optimizations of XLA:CPU code off (XLA's own HLO passes still run): measured on
# the whole suite (2 cores), 1,492 s of CPU instead of 1,812 s: compiling dominates, and
# the runtime-heavy SmolLM2 tests that run slower are few. Float results can move at the
# rounding level (no FMA contraction): the paged-vs-dense SmolLM2 logits differ by up to
# 1.3e-3 instead of 5.5e-4 (of ~40). Set the flag yourself to test LLVM-optimized code.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
# XLA:CPU's MLIR fusion emitters off (the elemental IR emitters instead): compiling the
# cache's plan_step took 1.95 s with them and 1.01 s without, and tests/test_drop.py 88 ->
# 47 CPU-s (whole suite: 977 -> 709 s on 2 cores); compiling is most of what the suite
# spends. Kept to the tests: at XLA's default level a SmolLM2 decode step (batch 8, context
# 512) took 157 ms without them against 117 ms with them (one run each).
if "xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
# One LLVM module per XLA program, compiled on the calling thread (XLA splits a program's code
# over several threads by default): with two xdist workers on two cores the split threads only
# contend, and tests/test_prefix_index.py spent 16.2 s (three runs: 15.8-16.4) compiling
# instead of 19.6 (17.7-21.7). The same kernels, compiled as one module instead of several.
if "xla_cpu_parallel_codegen_split_count" not in _flags:
  _flags += " --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KVJAX_COMPILE_CACHE", "off")   # CLI runs in tests write no XLA cache
os.environ.setdefault("KVJAX_L3_DIR", "off")   # nor a default L3 (a test names its folder)

_CACHE_ENV = "KVJAX_TEST_XLA_CACHE"
if _CACHE_ENV not in os.environ:
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="kvjax-tests-xla-")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], True)
if os.environ[_CACHE_ENV].strip().lower() not in ("", "off"):   # dequantized GGUF weights, shared
  os.environ.setdefault("KVJAX_WEIGHTS_CACHE", os.path.join(os.environ[_CACHE_ENV], "weights"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ[_CACHE_ENV].strip().lower() not in ("", "off"):
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # a size limit turns on the cache's file lock: workers never read a half-written entry
  jax.config.update("jax_compilation_cache_max_size", 4 << 30)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
  """Drop compiled executables after each test module.

  A worker runs many modules; without this it keeps every executable they
  compiled (7+ GB resident and tens of thousands of memory maps over the
  suite, where XLA's CPU compiler crashed with a segfault near the end).
  """
  yield
  jax.clear_caches()


def pytest_collection_modifyitems(config, items):
  """Under xdist, run the modules with a ``slow`` test first, then the rest by test count.

  ``--dist loadfile`` hands whole modules out in collection order (pyproject.toml turns off
  xdist's own reordering, which sorts modules by test count alone and so put the long
  modules with few tests, e.g. the SmolLM2 perplexity, last: one worker finished them
  while the other sat idle). Long modules first leaves short ones to even out the end.
  Plain (``-n 0``) runs keep the file order.
  """
  if not hasattr(config, "workerinput"):
    return
  modules = {}
  for item in items:
    modules.setdefault(item.nodeid.split("::")[0], []).append(item)
  slow = {m for m, its in modules.items() if any(i.get_closest_marker("slow") for i in its)}
  order = sorted(modules, key=lambda m: (m not in slow, -len(modules[m])))
  items[:] = [item for m in order for item in modules[m]]
