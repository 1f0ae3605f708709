"""Swap instead of refusal: an over-subscribed batch with and without swap, and the tiered
loop's cost on a batch that never swaps (random-weight Llama models, in one process).

Reported (JSON, benchmarks/results/swap.json; ``--quick``: swap_quick.json):
  completed_plain / completed_swap: requests (of ``--batch``) that finished (not
    ``out_of_pages``) when the pool holds about ``--fill`` of what the batch needs:
    the plain loop (refusal) and the tiered loop (``generate(..., tiers=...)``, bf16 L2).
  swap_equals_reference: requests whose greedy tokens equal those of the same batch in a
    pool big enough for all (the plain loop): must be all of them.
  swaps_out, tokens_recomputed, steps_*: what the swapping cost.
  step_overhead: per decode step, the tiered loop's time over the plain loop's on a
    batch that fits (no swap, no eviction), median of the steps' times (``on_step``
    intervals), best of ``reps`` interleaved runs; for each model.

Models: "small" (``LlamaConfig.small()``: a ~1 ms step, where host work shows most) and
"mid" (4 layers x 256, a few ms). The full run adds "wide" (8 layers x 512).

  python benchmarks/swap.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

import kvjax
from kvjax import tiers
from kvjax.models import generate
from kvjax.models import init_params
from kvjax.models import LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODELS = {
    "small": LlamaConfig.small(),
    "mid": LlamaConfig(vocab_size=1024, d_model=256, num_layers=4, num_heads=8, num_kv_heads=4,
                       head_dim=32, ffn_dim=768, rope_base=10000.0, rms_eps=1e-5),
    "wide": LlamaConfig(vocab_size=4096, d_model=512, num_layers=8, num_heads=8,
                        num_kv_heads=4, head_dim=64, ffn_dim=1536, rope_base=10000.0,
                        rms_eps=1e-5),
}
PAGE, CHUNK = 8, 16


def workload(batch: int, max_new: int, seed: int = 0):
  """Prompts of 24-56 tokens and each request's pages (prompt + max_new)."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(1, 250, int(n)).tolist() for n in rng.integers(24, 57, batch)]
  pages = [-(-(len(p) + max_new) // PAGE) for p in prompts]
  return prompts, pages


def timed_generate(params, cache, prompts, **kw):
  """(replies, cache, wall seconds, decode step intervals)."""
  marks = []
  t0 = time.perf_counter()
  out, cache = generate(params, cache, prompts, list(range(len(prompts))),
                        on_step=lambda n: marks.append(time.perf_counter()), **kw)
  wall = time.perf_counter() - t0
  return out, cache, wall, np.diff(marks)


def oversubscribed(model: str, batch: int, max_new: int, fill: float) -> dict:
  """Completed requests with and without swap when the pool holds ``fill`` of the need."""
  cfg = MODELS[model]
  params = init_params(cfg, jax.random.key(0))
  prompts, pages = workload(batch, max_new)
  m = -(-max(pages) // 16) * 16
  big = cfg.cache_config(page_size=PAGE, num_pages=sum(pages) + batch, max_seqs=batch,
                         max_pages_per_seq=m)
  small = cfg.cache_config(page_size=PAGE, num_pages=max(int(fill * sum(pages)), max(pages)),
                           max_seqs=batch, max_pages_per_seq=m)
  tc = tiers.TierConfig(l2_pages=2 * sum(pages), l2_preset="bf16")
  kw = dict(config=cfg, max_new_tokens=max_new, stop_ids=(), chunk_size=CHUNK)
  res = {}
  for _ in range(2):   # the first run compiles
    ref, _, t_ref, _ = timed_generate(params, kvjax.init(big), prompts, cache_config=big, **kw)
    plain, _, t_plain, _ = timed_generate(params, kvjax.init(small), prompts,
                                          cache_config=small, **kw)
    stats = {}
    got, ts, t_swap, steps = timed_generate(params, tiers.init(small, tc), prompts,
                                            cache_config=small, tiers=tc, stats=stats, **kw)
  done = lambda out: sum(r.finish_reason != "out_of_pages" for r in out)   # noqa: E731
  res.update(
      model=model, batch=batch, max_new_tokens=max_new, page_size=PAGE, chunk_size=CHUNK,
      pages_needed=sum(pages), pool_pages=small.num_pages, l2_pages=tc.l2_pages,
      completed_plain=done(plain), completed_swap=done(got),
      tokens_plain=sum(len(r) for r in plain), tokens_swap=sum(len(r) for r in got),
      swap_equals_reference=sum(list(a) == list(b) for a, b in zip(got, ref)),
      swaps_out=int(ts.stats.swaps_out), swaps_in=int(ts.stats.swaps_in),
      tokens_recomputed=stats.get("recomputed", 0), demotions=int(ts.stats.demotions),
      promotions=int(ts.stats.promotions), l1_evictions=int(ts.l1.stats.evictions),
      wall_s_reference=t_ref, wall_s_plain=t_plain, wall_s_swap=t_swap,
      steps_swap=len(steps) + 1)
  return res


def overhead(model: str, batch: int, max_new: int, reps: int) -> dict:
  """Median decode step time, tiered loop over plain loop, on a batch that fits."""
  cfg = MODELS[model]
  params = init_params(cfg, jax.random.key(0))
  prompts, pages = workload(batch, max_new, seed=1)
  cc = cfg.cache_config(page_size=PAGE, num_pages=2 * sum(pages), max_seqs=batch,
                        max_pages_per_seq=-(-max(pages) // 16) * 16)
  tc = tiers.TierConfig(l2_pages=2 * sum(pages), l2_preset="bf16")
  kw = dict(config=cfg, cache_config=cc, max_new_tokens=max_new, stop_ids=(),
            chunk_size=CHUNK)
  med = {"plain": [], "tiered": []}
  wall = {"plain": [], "tiered": []}
  for i in range(reps + 1):    # rep 0 compiles
    for mode in ("plain", "tiered"):
      cache = kvjax.init(cc) if mode == "plain" else tiers.init(cc, tc)
      out, cache, t, steps = timed_generate(params, cache, prompts,
                                            tiers=tc if mode == "tiered" else None, **kw)
      if mode == "tiered":
        assert int(cache.stats.swaps_out) == 0
      if i:
        med[mode].append(statistics.median(steps[1:]))   # decode steps (the first: prefill)
        wall[mode].append(t)
  best = {k: min(v) for k, v in med.items()}
  return {"model": model, "batch": batch, "max_new_tokens": max_new, "reps": reps,
          "step_s_plain": best["plain"], "step_s_tiered": best["tiered"],
          "step_overhead": best["tiered"] / best["plain"],
          "wall_overhead": min(wall["tiered"]) / min(wall["plain"]),
          "step_overhead_us": 1e6 * (best["tiered"] - best["plain"])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer requests and models")
  parser.add_argument("--out", default=None)
  parser.add_argument("--fill", type=float, default=0.5,
                      help="pool pages over what the over-subscribed batch needs")
  args = parser.parse_args()
  out = args.out or ("benchmarks/results/swap_quick.json" if args.quick
                     else "benchmarks/results/swap.json")
  models = ("small", "mid") if args.quick else ("small", "mid", "wide")
  batch, max_new, reps = (8, 24, 3) if args.quick else (16, 64, 5)
  res = {"benchmark": "swap", "quick": args.quick, "machine": common.machine(),
         "oversubscribed": oversubscribed("mid", batch, max_new, args.fill),
         "overhead": {m: overhead(m, batch, max_new, reps) for m in models}}
  o = res["oversubscribed"]
  for k in ("completed_plain", "completed_swap", "swap_equals_reference", "swaps_out"):
    res[k] = o[k]
  res["step_overhead"] = {m: v["step_overhead"] for m, v in res["overhead"].items()}
  common.write_json(out, res)
  print(f"over-subscribed ({o['model']}, {o['batch']} requests x {o['max_new_tokens']} tokens, "
        f"pool {o['pool_pages']} of {o['pages_needed']} pages):")
  print(f"  completed: plain {o['completed_plain']}, swap {o['completed_swap']} "
        f"(equal to the big-pool run: {o['swap_equals_reference']}); {o['swaps_out']} swaps, "
        f"{o['tokens_recomputed']} tokens recomputed; wall plain {o['wall_s_plain']:.2f}s, "
        f"swap {o['wall_s_swap']:.2f}s, big pool {o['wall_s_reference']:.2f}s")
  print("model   step plain   step tiered   overhead")
  for m, v in res["overhead"].items():
    print(f"{m:<7} {1e3 * v['step_s_plain']:8.2f} ms {1e3 * v['step_s_tiered']:10.2f} ms"
          f"   {v['step_overhead']:.3f} ({v['step_overhead_us']:+.0f} us)")
  print("wrote", out)


if __name__ == "__main__":
  main()
