"""Benchmark: the cache's ops called eagerly, compiled (``jit_when_eager``) against op by op.

A host loop, a notebook or a test that calls ``plan_step`` / ``attach_prefix`` /
``release`` between jitted steps calls them eagerly. Both ways run in the same
process on the same inputs:

* compiled: the public op (``kvjax.plan_step`` ...), which runs eagerly as one
  ``jax.jit`` program per shape and static config;
* op by op: the same function unwrapped (``fn.__wrapped__``), as JAX runs any
  function that is not jitted: each primitive is dispatched on its own.

Figures per op: the first call (compile or first dispatch included) and the
median of the next calls; ``op_by_op_over_compiled`` is the ratio of the medians
(> 1: compiling is faster); the compiled first call is the compile. Also
the StableHLO size of ``plan_step`` at the same config.

  python benchmarks/eager.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

import common  # benchmarks/common.py: machine description, results writer
import kvjax

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eager.json")


def timed(fn, reps: int) -> tuple[float, float]:
  """(first call s, median of ``reps`` further calls s), each to ``block_until_ready``."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer repetitions")
  ap.add_argument("--out", default=DEFAULT_OUT)
  args = ap.parse_args(argv)
  reps = 3 if args.quick else 10
  cfg = kvjax.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4,
                          num_pages=64, max_seqs=4, max_pages_per_seq=16)
  seq_ids = jnp.arange(4)
  tokens = jnp.arange(4 * 16).reshape(4, 16) % 7
  num = jnp.full((4,), 16)
  _, filled = kvjax.plan_step(kvjax.init(cfg), seq_ids, tokens, num, config=cfg)
  done = kvjax.release(filled, seq_ids, config=cfg)     # pages cached: attach finds them
  jax.clear_caches()   # the set-up compiled plan_step and release: their first calls compile
  ops = {
      "plan_step": (kvjax.plan_step, lambda f: f(filled, seq_ids, tokens, num, config=cfg)),
      "attach_prefix": (kvjax.attach_prefix, lambda f: f(done, seq_ids, tokens, num,
                                                          config=cfg)),
      "release": (kvjax.release, lambda f: f(filled, seq_ids, config=cfg)),
  }
  results = {}
  for name, (op, call) in ops.items():
    first_c, steady_c = timed(lambda: call(op), reps)
    first_e, steady_e = timed(lambda: call(op.__wrapped__), reps)
    results[name] = {"compiled_first_s": first_c, "compiled_s": steady_c,
                     "op_by_op_first_s": first_e, "op_by_op_s": steady_e,
                     "op_by_op_over_compiled": steady_e / steady_c}
    print(f"{name:>14}: compiled first {first_c:6.2f} s, then {steady_c * 1e3:8.3f} ms; "
          f"op by op first {first_e:6.2f} s, then {steady_e * 1e3:8.1f} ms "
          f"({steady_e / steady_c:,.0f}x)", flush=True)
  lines = jax.jit(kvjax.plan_step.__wrapped__, static_argnames="config").lower(
      filled, seq_ids, tokens, num, config=cfg).as_text().count("\n")
  print(f"plan_step: {lines} StableHLO lines")
  common.write_json(args.out, {
      "benchmark": "eager", "machine": common.machine(), "quick": args.quick,
      "config": str(cfg), "ops": results,
      "plan_step_stablehlo_lines": lines,
      "definition": "op_by_op_over_compiled = median eager call time of the unwrapped op "
                    "(primitive by primitive) / that of the public op (one compiled program)"})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
