"""Test set-up: 8 host devices (set before jax is imported) so sharding runs on CPU."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KVJAX_COMPILE_CACHE", "off")   # CLI runs in tests write no XLA cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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
