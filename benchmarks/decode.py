"""Decode-step time: the paged cache against a dense contiguous cache, same model, same run.

The dense baseline keeps K/V as ``[layers, batch, max_len, kv_heads, head_dim]``
(as MaxText and JetStream do), writes each new token at its position and
attends over ``max_len`` with a length mask. The paged cache runs the model's
real ``decode_step`` (plan_step + per-layer write/attend, cache donated). Both
use SmolLM2-135M's architecture (30 layers, 9 query / 3 KV heads, head_dim 64)
with random weights; both caches are filled with the same random K/V first.

Reports for batch 1 / 4 / 8 x context 128 / 512 / 2,048 (``--quick``: 4 layers,
batch 8, context 512): ``paged_over_dense`` (paged step time / dense step
time), ``plan_share`` (``plan_step`` alone / paged step), ``over_bound`` (paged
step / the bandwidth bound: weights plus live K/V over the bandwidth measured
in the same run, the faster of a copy and a GEMV), ``pool_scaling`` (the paged
step with a pool 16x what the batch needs over the step at 2x),
``table_scaling`` (the paged step with a page table 4x wider than the context,
as the demo sizes it for its longest chat, over the step with a table sized
to the context: attention over the full width, and with the host loops'
``context_pages`` bucket) and ``compile_s`` per shape (first call less a
steady step).

  python benchmarks/decode.py [--quick] [--out FILE] [--batches 1,4,8] [--contexts 128,512]
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
from kvjax.models.generate import context_bucket
import common  # benchmarks/common.py: machine description, results writer
from kvjax.cache.attend import grouped_attention


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("k_cache", "v_cache"))
def dense_decode_step(params, k_cache, v_cache, lengths, tokens, *, config):
  """Dense-cache decode of one token per row. k_cache/v_cache: [L, B, N, H, D]; lengths: [B].

  The caches ride in the layer scan's carry and each layer writes its one new
  token per row in place (the dense baseline as a good dense cache does it).
  """
  b = tokens.shape[0]
  n = k_cache.shape[2]
  positions = lengths[:, None]
  visible = jnp.arange(n)[None, None, :] <= positions[:, :, None]      # [B, 1, N]
  rows = jnp.arange(b)

  def body(carry, xs):
    x, kc, vc = carry
    lp, i = xs

    def dense(q, k, v):
      kc2 = kc.at[i, rows, lengths].set(k[:, 0])
      vc2 = vc.at[i, rows, lengths].set(v[:, 0])
      return grouped_attention(q, kc2[i], vc2[i], visible), (kc2, vc2)

    x, (kc, vc) = llama.decoder_layer(lp, x, positions, dense, config)
    return (x, kc, vc), None

  x = params.embed[tokens]
  (x, k_cache, v_cache), _ = jax.lax.scan(body, (x, k_cache, v_cache),
                                          (params.layers, jnp.arange(k_cache.shape[0])))
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


def bandwidth_gbs(reps: int = 5) -> dict:
  """What this machine streams, measured now: a 1 GiB copy and a 256 MiB float32 GEMV.

  The bound uses the faster of the two (a lower bound on a step's time).
  """
  rng = np.random.default_rng(0)
  src = np.ones(1 << 28, np.float32)                # 1 GiB
  dst = np.empty_like(src)
  copy_s = _time(lambda: np.copyto(dst, src), reps)
  w = jnp.asarray(rng.normal(size=(8192, 8192)).astype(np.float32))   # 256 MiB
  x = jnp.ones((1, 8192), jnp.float32)
  gemv = jax.jit(lambda w, x: x @ w)
  gemv(w, x).block_until_ready()
  gemv_s = _time(lambda: gemv(w, x).block_until_ready(), reps)
  copy_gbs, gemv_gbs = 2 * src.nbytes / copy_s / 1e9, w.nbytes / gemv_s / 1e9
  return {"copy_gbs": copy_gbs, "gemv_gbs": gemv_gbs, "bound_gbs": max(copy_gbs, gemv_gbs)}


def step_bytes(config, batch: int, context: int, dtype_bytes: int = 4) -> int:
  """Bytes a decode step must read at least: every weight once plus the live K/V."""
  e, f, l_ = config.d_model, config.ffn_dim, config.num_layers
  per_layer = (e * config.num_heads * config.head_dim * 2            # q, o
               + e * config.num_kv_heads * config.head_dim * 2       # k, v
               + 3 * e * f + 2 * e)                                   # mlp, norms
  weights = l_ * per_layer + config.vocab_size * e + e               # tied embedding / head
  kv = 2 * l_ * batch * context * config.num_kv_heads * config.head_dim
  return (weights + kv) * dtype_bytes


def run_context(config, params, batch: int, context: int, page_size: int, steps: int,
                rounds: int, pool_factor: int = 2, table_factor: int = 1,
                bucketed: bool = False) -> dict:
  """Fill both caches to ``context - 2*steps*rounds - 1`` tokens, then time decode steps.

  The paged pool holds ``pool_factor`` times the pages the batch needs (a cache
  holds more than one batch) and its page table ``table_factor`` times the
  context's pages (``bucketed``: attention over the host loops' bucket,
  ``generate.context_bucket``, instead of the table's width); the dense cache
  is sized to the context.
  """
  max_len = context
  pages_per_seq = max_len // page_size * table_factor
  cc = config.cache_config(page_size=page_size, num_pages=batch * pages_per_seq * pool_factor,
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
  width = context_bucket(np.array([context]), page_size, pages_per_seq) if bucketed else None
  state = {"cache": cache, "dense": (k_dense, v_dense, lengths)}

  def paged_steps():
    c = state["cache"]
    for _ in range(steps):
      logits, c = llama.decode_step(params, c, tokens, seq_ids, ones, config=config,
                                    cache_config=cc, context_pages=width)
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

  # Warm up (the first call compiles), then alternate so both see the same machine load.
  t0 = time.perf_counter()
  paged_steps()
  first_s = time.perf_counter() - t0
  dense_steps(), plan_steps()
  paged_t, dense_t, plan_t = [], [], []
  for _ in range(rounds):
    paged_t.append(_time(paged_steps, 1) / steps)
    dense_t.append(_time(dense_steps, 1) / steps)
    plan_t.append(_time(plan_steps, 1) / steps)
  paged, dense, plan = (statistics.median(x) for x in (paged_t, dense_t, plan_t))
  assert int(state["cache"].status) == 0, kvjax.status_names(int(state["cache"].status))
  return {"batch": batch, "context": context, "page_size": page_size,
          "num_pages": cc.num_pages, "pool_factor": pool_factor,
          "max_pages_per_seq": pages_per_seq, "context_pages": width,
          "compile_s": first_s - steps * paged, "paged_step_s": paged,
          "dense_step_s": dense, "plan_step_s": plan, "paged_over_dense": paged / dense,
          "plan_share": plan / paged, "paged_rounds_s": paged_t, "dense_rounds_s": dense_t}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few layers and steps (smoke run)")
  parser.add_argument("--out", default="benchmarks/results/decode.json")
  parser.add_argument("--batches", default=None, help="comma list (default 1,4,8; quick 8)")
  parser.add_argument("--contexts", default=None,
                      help="comma list (default 128,512,2048; quick 512)")
  parser.add_argument("--page-size", type=int, default=16)
  args = parser.parse_args(argv)

  config = SMOLLM2_135M
  steps, rounds = (2, 3) if args.quick else (4, 3)
  if args.quick:
    config = llama.LlamaConfig(**{**config.__dict__, "num_layers": 4})
  batches = [int(b) for b in (args.batches or ("8" if args.quick else "1,4,8")).split(",")]
  contexts = args.contexts or ("512" if args.quick else "128,512,2048")
  contexts = [int(c) for c in contexts.split(",")]
  params = llama.init_params(config, jax.random.key(0))
  bw = bandwidth_gbs()
  print(f"bandwidth: copy {bw['copy_gbs']:.1f} GB/s, gemv {bw['gemv_gbs']:.1f} GB/s", flush=True)
  results = {}
  for b in batches:
    for ctx in contexts:
      r = run_context(config, params, b, ctx, args.page_size, steps, rounds)
      r["bound_s"] = step_bytes(config, b, ctx) / (bw["bound_gbs"] * 1e9)   # the faster one
      r["over_bound"] = r["paged_step_s"] / r["bound_s"]
      results[f"b{b}_c{ctx}"] = r
      print(f"batch {b} context {ctx}: paged {r['paged_step_s']*1e3:.2f} ms, dense "
            f"{r['dense_step_s']*1e3:.2f} ms, bound {r['bound_s']*1e3:.2f} ms, "
            f"plan {r['plan_step_s']*1e3:.3f} ms, compile {r['compile_s']:.1f} s", flush=True)
  # Pool scaling: the same batch and context with a pool 16x what it needs against 2x.
  sb, sc = max(batches), (512 if 512 in contexts else contexts[0])
  big = run_context(config, params, sb, sc, args.page_size, steps, rounds, pool_factor=16)
  small = results[f"b{sb}_c{sc}"]
  pool_scaling = big["paged_step_s"] / small["paged_step_s"]
  print(f"pool scaling (batch {sb}, context {sc}): {big['num_pages']} pages "
        f"{big['paged_step_s']*1e3:.2f} ms / {small['num_pages']} pages "
        f"{small['paged_step_s']*1e3:.2f} ms = {pool_scaling:.3f}", flush=True)
  # Table scaling: a page table 4x the context (the demo's sizing), full width vs bucketed.
  wide = run_context(config, params, sb, sc, args.page_size, steps, rounds, table_factor=4)
  wide_b = run_context(config, params, sb, sc, args.page_size, steps, rounds, table_factor=4,
                       bucketed=True)
  table_scaling = {"full_width": wide["paged_step_s"] / small["paged_step_s"],
                   "bucketed": wide_b["paged_step_s"] / small["paged_step_s"],
                   "context_pages": wide_b["context_pages"],
                   "max_pages_per_seq": wide["max_pages_per_seq"]}
  print(f"table scaling (batch {sb}, context {sc}, table 4x): full width "
        f"{table_scaling['full_width']:.3f}, bucketed ({wide_b['context_pages']} of "
        f"{wide['max_pages_per_seq']} pages) {table_scaling['bucketed']:.3f}", flush=True)
  key = f"b{sb}_c{sc}"
  out = {
      "benchmark": "decode", "quick": args.quick, "machine": common.machine(),
      "model": {"layers": config.num_layers, "heads": config.num_heads,
                "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                "dtype": "float32"},
      "page_size": args.page_size, "bandwidth": bw,
      "pool_scaling": pool_scaling,
      "table_scaling": table_scaling,
      "over_bound": results[key]["over_bound"],
      "over_bound_at": key,
      "paged_over_dense": {c: r["paged_over_dense"] for c, r in results.items()},
      "plan_share": {c: r["plan_share"] for c, r in results.items()},
      "compile_s": {c: r["compile_s"] for c, r in results.items()},
      "over_hf": None,
      "over_hf_note": "HF transformers (torch) is not installed on this machine: not measured",
      "targets": {"pool_scaling": 1.1, "over_bound": 2.0, "paged_over_dense": 1.0,
                  "plan_share": 0.05},
      "details": {**results, f"{key}_pool16": big, f"{key}_table4": wide,
                  f"{key}_table4_bucketed": wide_b},
  }
  common.write_json(args.out, out, indent=2)
  print(f"\nmachine: {out['machine']['platform']}, {out['machine']['cpu_count']} cpus, "
        f"jax {jax.__version__} ({jax.default_backend()}), "
        f"load {out['machine']['load_average_1m']}")
  print(f"{'point':>10} {'paged ms':>9} {'dense ms':>9} {'bound ms':>9} {'paged/dense':>12} "
        f"{'over bound':>11} {'plan share':>11}")
  for c, r in results.items():
    print(f"{c:>10} {r['paged_step_s']*1e3:9.2f} {r['dense_step_s']*1e3:9.2f} "
          f"{r['bound_s']*1e3:9.2f} {r['paged_over_dense']:12.3f} {r['over_bound']:11.2f} "
          f"{r['plan_share']:11.4f}")
  print(f"pool_scaling {pool_scaling:.3f}")
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
