"""Benchmark: batched PrefixIndex insert+lookup against a Python dict doing the same work.

Work per batch size N: insert N random 64-bit block hashes (values = page ids) into an
empty table of capacity next_pow2(2N) (load 0.5 or less), then look all N up (all hits).
The index's placement key is fixed per N (reproducible); its default budget is used.

* index: one jitted ``index_insert`` then one jitted ``index_lookup``, timed to
  ``block_until_ready``; inputs already on the device; compile excluded (warm-up).
* dict: ``d[k] = v`` for each item, then ``d.get(k, -1)`` for each, keys already
  Python ints (the dict's best case: no device->host conversion is charged).

``index_over_dict`` = index time / dict time for the same work (lower is better for
the index: < 1 means the jitted index is faster). Medians over repetitions.

  python benchmarks/prefix_index.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import common  # benchmarks/common.py: machine description, results writer
from kvjax.prefix.index import index_init
from kvjax.prefix.index import index_insert
from kvjax.prefix.index import index_lookup

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "prefix_index.json")
DEFINITION = ("index_over_dict = (jitted index insert+lookup time) / (Python dict insert+lookup "
              "time) for the same N items; < 1 means the index is faster")


def _median_time(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_batch(n: int, reps: int, max_probes: Optional[int], seed: int = 0) -> dict:
  rng = np.random.default_rng(seed + n)
  hashes_np = rng.integers(1, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
  values_np = np.arange(n, dtype=np.int32)
  capacity = max(16, 1 << int(np.ceil(np.log2(2 * n))))
  hashes, values = jnp.asarray(hashes_np), jnp.asarray(values_np)
  empty = index_init(capacity, max_probes=max_probes, key=seed + n)

  def run_index():
    index, overflow = index_insert(empty, hashes, values)
    found = index_lookup(index, hashes)
    return jax.block_until_ready((index, overflow, found))

  def run_insert():
    return jax.block_until_ready(index_insert(empty, hashes, values))

  full, _ = run_insert()

  def run_lookup():
    return jax.block_until_ready(index_lookup(full, hashes))

  keys = (hashes_np[:, 0].astype(np.uint64) << np.uint64(32) | hashes_np[:, 1]).tolist()
  vals = values_np.tolist()

  def run_dict():
    d = {}
    for k, v in zip(keys, vals):
      d[k] = v
    return [d.get(k, -1) for k in keys]

  # warm-up (compiles) and correctness: both agree, nothing overflows at this load
  _, overflow, found = run_index()
  run_lookup()
  assert not bool(np.asarray(overflow).any()), f"overflow at N={n}, capacity={capacity}"
  assert np.asarray(found).tolist() == run_dict()

  index_s = _median_time(run_index, reps)
  insert_s = _median_time(run_insert, reps)
  lookup_s = _median_time(run_lookup, reps)
  dict_s = _median_time(run_dict, reps)
  return {
      "batch": n,
      "capacity": capacity,
      "max_probes": empty.max_probes,
      "bucket_size": empty.bucket_size,
      "index_s": index_s,
      "index_insert_s": insert_s,
      "index_lookup_s": lookup_s,
      "dict_s": dict_s,
      "index_items_per_s": n / index_s,
      "dict_items_per_s": n / dict_s,
      "index_over_dict": index_s / dict_s,
  }


def run(quick: bool = False, max_probes: Optional[int] = None) -> dict:
  """All batch sizes; the JSON-ready result (``benchmarks/prefix.py`` can embed it)."""
  sizes = [256, 4096] if quick else [256, 4096, 65536]
  reps = 5 if quick else 20
  rows = [bench_batch(n, reps, max_probes) for n in sizes]
  return {
      "benchmark": "prefix_index",
      "quick": quick,
      "machine": common.machine(),
      "repetitions": reps,
      "definition": DEFINITION,
      "results": rows,
      "index_over_dict": rows[-1]["index_over_dict"],  # at the largest batch
  }


def print_table(result: dict) -> None:
  print(DEFINITION)
  print(f"{'N':>7} {'capacity':>9} {'index ms':>9} {'insert ms':>10} {'lookup ms':>10} "
        f"{'dict ms':>8} {'index/dict':>11}")
  for r in result["results"]:
    print(f"{r['batch']:>7} {r['capacity']:>9} {1e3 * r['index_s']:>9.3f} "
          f"{1e3 * r['index_insert_s']:>10.3f} {1e3 * r['index_lookup_s']:>10.3f} "
          f"{1e3 * r['dict_s']:>8.3f} {r['index_over_dict']:>11.2f}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
  parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
  parser.add_argument("--max-probes", type=int, default=None,
                      help="buckets probed per home (default: the index's default)")
  args = parser.parse_args(argv)

  print("machine:", json.dumps(common.machine()))
  result = run(args.quick, args.max_probes)
  common.write_json(args.out, result, indent=2)
  print(f"wrote {args.out}")
  print_table(result)
  return result


if __name__ == "__main__":
  main()
