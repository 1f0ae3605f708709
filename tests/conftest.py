"""Test set-up: 8 host devices (set before jax is imported) so sharding runs on CPU."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("KVJAX_COMPILE_CACHE", "off")   # CLI runs in tests write no XLA cache

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
