"""kvjax.xla_cpu's flag helpers, and ``settle``'s two forms (one scatter, or one write per
row when loop kernels are on) against a plain-Python model of in-order writes."""

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import xla_cpu
from kvjax.policies.scoring import deferred, put, settle


def test_enable_adds_the_flag_once_and_keeps_other_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.enable_loop_kernels(env)
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
  before = env["XLA_FLAGS"]
  assert xla_cpu.enable_loop_kernels(env) and env["XLA_FLAGS"] == before


def test_enable_leaves_the_users_extra_options_alone():
  env = {"XLA_FLAGS": "--xla_backend_extra_options=other=1"}
  assert not xla_cpu.enable_loop_kernels(env)
  assert env["XLA_FLAGS"] == "--xla_backend_extra_options=other=1"


def test_a_small_threshold_is_not_on():
  assert xla_cpu.loop_kernel_threshold({"XLA_FLAGS": xla_cpu.loop_kernel_flag(1024)}) == 1024
  assert not xla_cpu.loop_kernels_on({"XLA_FLAGS": xla_cpu.loop_kernel_flag(1024)})
  with pytest.raises(ValueError, match="threshold"):
    xla_cpu.loop_kernel_flag(-1)


@pytest.mark.parametrize("kernels", [False, True])
def test_settle_applies_pending_writes_in_order(monkeypatch, kernels):
  flags = xla_cpu.loop_kernel_flag() if kernels else ""
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert xla_cpu.loop_kernels_on() == kernels
  rng = np.random.default_rng(0)
  for _ in range(20):
    base = rng.integers(0, 100, 6)
    d, model = deferred(jnp.asarray(base, jnp.int32), 3), base.tolist()
    for _ in range(3):
      i, v, cond = int(rng.integers(0, 7)), int(rng.integers(100, 200)), bool(rng.random() < .8)
      d = put(d, np.int32(i), v, np.bool_(cond))
      if cond and i < 6:   # row 6 is out of range: no write
        model[i] = v
    assert np.asarray(settle(d).array).tolist() == model
