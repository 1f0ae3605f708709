"""Decode-step time: the paged cache against a dense contiguous cache, same model, same run.

The dense baseline keeps K/V as ``[layers, batch, max_len, kv_heads, head_dim]``
(as MaxText and JetStream do), writes each new token at its position and
attends over ``max_len`` with a length mask. The paged cache runs the model's
real ``decode_step`` (plan_step + per-layer write/attend, cache donated). Both
use SmolLM2-135M's architecture (30 layers, 9 query / 3 KV heads, head_dim 64)
with random weights; both caches are filled with the same random K/V first.

Reports per context: ``paged_over_dense`` (paged step time / dense step time)
and ``plan_share`` (time of ``plan_step`` alone / paged step time).

  python benchmarks/decode.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.models import llama
import common  # benchmarks/common.py: machine description, results writer
from kvjax.cache.attend import grouped_attention


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("k_cache", "v_cache"))
def dense_decode_step(params, k_cache, v_cache, lengths, tokens, *, config):
  """Dense-cache decode of one token per row. k_cache/v_cache: [L, B, N, H, D]; lengths: [B]."""
  b = tokens.shape[0]
  n = k_cache.shape[2]
  positions = lengths[:, None]
  visible = jnp.arange(n)[None, None, :] <= positions[:, :, None]      # [B, 1, N]
  rows = jnp.arange(b)

  def body(x, xs):
    lp, kc, vc = xs

    def dense(q, k, v):
      kc2 = kc.at[rows, lengths].set(k[:, 0])
      vc2 = vc.at[rows, lengths].set(v[:, 0])
      return grouped_attention(q, kc2, vc2, visible), (kc2, vc2)

    x, (kc, vc) = llama.decoder_layer(lp, x, positions, dense, config)
    return x, (kc, vc)

  x = params.embed[tokens]
  x, (k_cache, v_cache) = jax.lax.scan(body, x, (params.layers, k_cache, v_cache))
  return llama.lm_logits(params, x, config), k_cache, v_cache, lengths + 1


# SmolLM2-135M's shapes (the GGUF's metadata); weights are random: only time matters here.
SMOLLM2_135M = llama.LlamaConfig(vocab_size=49152, d_model=576, num_layers=30, num_heads=9,
                                 num_kv_heads=3, head_dim=64, ffn_dim=1536, rope_base=100000.0)


def _time(fn, reps: int) -> float:
  """Median seconds of ``fn()`` (which blocks) over ``reps`` runs."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def run_context(config, params, batch: int, context: int, page_size: int, steps: int,
                rounds: int) -> dict:
  """Fill both caches to ``context - steps*rounds`` tokens, then time decode steps."""
  max_len = context
  pages_per_seq = max_len // page_size
  cc = config.cache_config(page_size=page_size, num_pages=batch * pages_per_seq,
                           max_seqs=batch, max_pages_per_seq=pages_per_seq)
  fill = context - steps * rounds * 2 - 1
  rng = np.random.default_rng(0)
  kv_shape = (config.num_layers, batch, fill, config.num_kv_heads, config.head_dim)
  k_fill = jnp.asarray(rng.normal(size=kv_shape).astype(np.float32))
  v_fill = jnp.asarray(rng.normal(size=kv_shape).astype(np.float32))

  # Paged: plan the fill, then scatter the same K/V into the slots.
  cache = kvjax.init(cc)
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  plan, cache = jax.jit(kvjax.plan_step, static_argnames="config")(
      cache, seq_ids, jnp.zeros((batch, fill), jnp.int32), jnp.full((batch,), fill, jnp.int32),
      config=cc)
  slots = plan.slots.reshape(-1)
  flat = lambda a: a.reshape(config.num_layers, -1, config.num_kv_heads, config.head_dim)  # noqa
  kd = flat(cache.k.data).at[:, slots].set(flat(k_fill)).reshape(cache.k.data.shape)
  vd = flat(cache.v.data).at[:, slots].set(flat(v_fill)).reshape(cache.v.data.shape)
  cache = cache.replace(k=cache.k.replace(data=kd), v=cache.v.replace(data=vd))
  del kd, vd, plan

  # Dense: the same K/V at positions 0..fill-1.
  pad = ((0, 0), (0, 0), (0, max_len - fill), (0, 0), (0, 0))
  k_dense, v_dense = jnp.pad(k_fill, pad), jnp.pad(v_fill, pad)
  lengths = jnp.full((batch,), fill, jnp.int32)
  del k_fill, v_fill

  tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, 1)), jnp.int32)
  ones = jnp.ones((batch,), jnp.int32)
  state = {"cache": cache, "dense": (k_dense, v_dense, lengths)}

  def paged_steps():
    c = state["cache"]
    for _ in range(steps):
      logits, c = llama.decode_step(params, c, tokens, seq_ids, ones, config=config,
                                    cache_config=cc)
    jax.block_until_ready((logits, c))
    state["cache"] = c

  def dense_steps():
    kc, vc, ln = state["dense"]
    for _ in range(steps):
      logits, kc, vc, ln = dense_decode_step(params, kc, vc, ln, tokens, config=config)
    jax.block_until_ready((logits, kc))
    state["dense"] = (kc, vc, ln)

  @jax.jit
  def plan_fn(c, seq_ids, tokens, num_new):
    # Block management alone: return what plan_step computes, not the page
    # arrays it passes through (an undonated copy of them would be timed).
    plan, c = kvjax.plan_step(c, seq_ids, tokens, num_new, config=cc)
    return plan, c.meta, c.page_table, c.seq_lens, c.stats, c.status

  def plan_steps():
    c = state["cache"]
    for _ in range(steps):
      out = plan_fn(c, seq_ids, tokens, ones)
    jax.block_until_ready(out)

  # Warm up (compile), then alternate so both see the same machine load.
  paged_steps(), dense_steps(), plan_steps()
  paged_t, dense_t, plan_t = [], [], []
  for _ in range(rounds):
    paged_t.append(_time(paged_steps, 1) / steps)
    dense_t.append(_time(dense_steps, 1) / steps)
    plan_t.append(_time(plan_steps, 1) / steps)
  paged, dense, plan = (statistics.median(x) for x in (paged_t, dense_t, plan_t))
  assert int(state["cache"].status) == 0, kvjax.status_names(int(state["cache"].status))
  return {"context": context, "page_size": page_size, "paged_step_s": paged,
          "dense_step_s": dense, "plan_step_s": plan, "paged_over_dense": paged / dense,
          "plan_share": plan / paged, "paged_rounds_s": paged_t, "dense_rounds_s": dense_t}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few layers and steps (smoke run)")
  parser.add_argument("--out", default="benchmarks/results/decode.json")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--contexts", default="512,2048")
  parser.add_argument("--page-size", type=int, default=16)
  args = parser.parse_args(argv)

  config = SMOLLM2_135M
  steps, rounds = (2, 3) if args.quick else (8, 7)
  if args.quick:
    config = llama.LlamaConfig(**{**config.__dict__, "num_layers": 4})
  params = llama.init_params(config, jax.random.key(0))
  results = {}
  for ctx in (int(c) for c in args.contexts.split(",")):
    r = run_context(config, params, args.batch, ctx, args.page_size, steps, rounds)
    results[str(ctx)] = r
    print(f"context {ctx}: paged {r['paged_step_s']*1e3:.2f} ms, dense "
          f"{r['dense_step_s']*1e3:.2f} ms, plan {r['plan_step_s']*1e3:.3f} ms", flush=True)
  out = {
      "benchmark": "decode", "quick": args.quick, "machine": common.machine(),
      "model": {"layers": config.num_layers, "heads": config.num_heads,
                "kv_heads": config.num_kv_heads, "head_dim": config.head_dim},
      "batch": args.batch, "page_size": args.page_size,
      "paged_over_dense": {c: r["paged_over_dense"] for c, r in results.items()},
      "plan_share": {c: r["plan_share"] for c, r in results.items()},
      "targets": {"paged_over_dense": 1.25, "plan_share": 0.05},
      "details": results,
  }
  common.write_json(args.out, out, indent=2)
  print(f"\nmachine: {out['machine']['platform']}, {out['machine']['cpu_count']} cpus, "
        f"jax {jax.__version__} ({jax.default_backend()})")
  print(f"{'context':>8} {'paged ms':>9} {'dense ms':>9} {'paged/dense':>12} {'plan share':>11}")
  for c, r in results.items():
    print(f"{c:>8} {r['paged_step_s']*1e3:9.2f} {r['dense_step_s']*1e3:9.2f} "
          f"{r['paged_over_dense']:12.3f} {r['plan_share']:11.4f}")
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
