"""kvjax.xla_cpu's flag helpers; ``settle``'s two forms (one scatter, or one write per row
when loop kernels are on) against a plain-Python model of in-order writes; the sampled
simulator's runs in turn against vmapped ones; and the simulator's hits with loop kernels
compiled for real (a child process) against this process's."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import xla_cpu
from kvjax.policies.contract import make_params
from kvjax.policies.scoring import deferred, put, settle
from kvjax.sim import simulator, traces


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


@pytest.mark.parametrize("policy", ["autoclass", "lfu"])
def test_runs_in_turn_give_the_vmapped_runs_hits(monkeypatch, policy):
  """With loop kernels on, a multi-run simulation on the sampled path runs its scans one
  after another (``lax.map``); each run's hits must be those of the vmapped program and
  of that run alone."""
  trace = traces.generate(60, seed=3)
  caps = [8, 24, 40]
  params = [make_params(policy) for _ in caps]
  got = {}
  for kernels in (False, True):
    monkeypatch.setenv("XLA_FLAGS", xla_cpu.loop_kernel_flag() if kernels else "")
    got[kernels] = simulator.simulate_hits(trace, caps, policy, params, sample=4)
  np.testing.assert_array_equal(got[True], got[False])
  for i in (0, len(caps) - 1):   # [c, c]: two runs, so in turn; padded to c, not 40
    alone = simulator.simulate_hits(trace, [caps[i]] * 2, policy, [params[i]] * 2,
                                    sample=4)[0]
    np.testing.assert_array_equal(got[True][i], alone)


_CHILD = """
import sys, numpy as np
from kvjax import xla_cpu
assert xla_cpu.enable_loop_kernels() and xla_cpu.loop_kernels_on()
from kvjax.sim import simulator, traces
trace = traces.generate(80, seed=5)
out = {f"{p}-{k}": simulator.simulate_hits(trace, [16, 48], p, **kw)
       for p in ("autoclass", "lfu", "s3fifo", "arc")
       for k, kw in (("scoring", {"path": "exact" if p == "arc" else "scoring"}),
                     ("sampled", {"sample": 8}))
       if not (p == "arc" and k == "sampled")}
np.savez(sys.argv[1], **out)
"""


def test_loop_kernels_compiled_for_real_give_the_same_hits(tmp_path):
  """The CLI and benchmarks run the simulator with loop kernels on; the tests do not.
  A child process with the flag set before JAX starts (so the kernels are really
  compiled) must get the hit flags this process gets without it."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "hits.npz"
  r = subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  got = np.load(out)
  trace = traces.generate(80, seed=5)
  assert len(got.files) == 7
  for name in got.files:
    p, k = name.split("-")
    kw = {"path": "exact" if p == "arc" else "scoring"} if k == "scoring" else {"sample": 8}
    np.testing.assert_array_equal(got[name], simulator.simulate_hits(trace, [16, 48], p, **kw),
                                  err_msg=name)
