"""What quantized KV pages cost SmolLM2-135M: perplexity, greedy agreement, attention error.

Everything runs THROUGH THE PAGED CACHE (``kvjax.models.decode_step``), once
per KV spec, against the bf16 cache measured in the same run:

* ``ppl`` / ``rel_ppl_increase``: perplexity on ``pydoc_data.topics`` (the
  foundation figure's tokens: windows of 1024, no BOS, no state across
  windows), each window prefilled in chunks into an empty cache;
  ``rel_ppl_increase = ppl / ppl_bf16 - 1``.
* ``agreement``: greedy decoding of 256 tokens from 8 chat prompts; the
  fraction of positions whose token equals the bf16 cache's, and
  ``prefix_match`` (mean share of tokens before the first difference).
* ``attn_rel_err``: per layer, ||out - exact|| / ||exact|| of the attention
  output over one window, where q/k/v come from a float32 forward and
  ``exact`` is float32 attention: each layer alone through a one-layer cache
  of the spec (prefill chunks, the same causal view as ``write_attend``).
* ``compression``: bf16 bytes per cached token (K+V, all layers) over the
  spec's, scales and zero points included (``kvjax.layout.compression``).

The pseudo-spec ``float32`` (an unquantized float32 cache) calibrates the
bf16 baseline: how far does a cache with *less* error than bf16 drift from it?

``--emulate`` measures recipes the cache cannot hold (yet) without the cache:
a causal forward whose attention reads, per (query, key), the key's page
quantize-dequantized (``quant.quantize_pages`` on the bf16-rounded K/V) iff
the cache's rule says the query sees it folded, else the bf16 values (the
reference of tests/test_quant_cache.py). A spec name may then carry
modifiers: ``+k4@18.7.14`` stores K of those layers in 4 bits (a per-layer
spec), ``+prerope`` quantizes keys before RoPE and rotates the dequantized
key (KVQuant), ``+k16`` / ``+v16`` leave K / V unquantized (which of the two
costs what), ``+sink32`` keeps the first 32 tokens' K/V unquantized (an
attention-sink page, StreamingLLM/KVQuant). Perplexity and compression only.

Usage: python benchmarks/quality.py [--quick] [--out FILE] [--specs a,b,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.models.gguf_loader import load_smollm2
from kvjax.models.llama import decoder_layer
from kvjax.models.llama import causal_attention
from kvjax.models.llama import lm_logits
from kvjax.models.llama import decode_step
from kvjax.models.llama import rope
from kvjax.models.perplexity import pydoc_windows
from kvjax.models.tokenizer import encode_chat
import common  # benchmarks/common.py: machine description, results writer
from kvjax import layout
from kvjax.cache.attend import write_attend
from kvjax import quant

SPECS = ("bf16", "int8", "fp8", "int4", "int4-kivi", "int2-r64", "int2-r128")
# issue 3's targets: perplexity increase at most 0.1 % (int8), 1 % (int4), 5 % (2-bit with a
# window); compression at least 1.9x, 3.5x, 6x. fp8 has none (DESIGN.md measured +1.0 %).
TARGETS = {"int8": 0.001, "int4": 0.01, "int4-kivi": 0.01, "int4-g32": 0.01, "int2-r64": 0.05,
           "int2-r128": 0.05, "int2-kivi-r128": 0.05, "int2-kmin-r128": 0.05}
COMPRESSION_TARGETS = {"int8": 1.9, "int4": 3.5, "int4-kivi": 3.5, "int4-g32": 3.5,
                       "int2-r64": 6.0, "int2-r128": 6.0, "int2-kivi-r128": 6.0,
                       "int2-kmin-r128": 6.0}
PAGE = 16
WINDOW = 1024
PROMPTS = (
    "Explain what a hash table is and when to use one.",
    "Write a short poem about the sea at night.",
    "What are the main causes of the French Revolution?",
    "Give me three tips for writing clean Python code.",
    "How does photosynthesis work? Explain simply.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Describe how to bake bread at home, step by step.",
)


def specs_of(name: str):
  """(key_spec, value_spec, cache dtype) of a preset; "float32" is an unquantized f32 cache.

  A cache row ``preset+prerope`` stores keys before RoPE (``CacheConfig.key_rope``).
  """
  name = name.removesuffix("+prerope")
  if name == "float32":
    return layout.QuantSpec(), layout.QuantSpec(), "float32"
  return (*layout.PRESETS[name], "bfloat16")


def cache_config(config, name: str, *, max_seqs: int, max_len: int) -> kvjax.CacheConfig:
  ks, vs, dtype = specs_of(name)
  m = -(-max_len // PAGE)
  return config.cache_config(page_size=PAGE, num_pages=max_seqs * m, max_seqs=max_seqs,
                             max_pages_per_seq=m, dtype=dtype, key_quant=ks,
                             value_quant=vs, prefix_caching=False,
                             prerope_keys=name.endswith("+prerope"))


@jax.jit
def _nll(logits, targets, mask):
  """float32 [B, T]: -log p(target) where mask, else 0."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.where(mask, logz - tgt, 0.0)


def window_nll(params, config, cc, windows: np.ndarray, chunk: int) -> np.ndarray:
  """float64 [W, WINDOW - 1] next-token NLLs, each window prefilled into an empty cache."""
  b = cc.max_seqs
  out = []
  for g in range(0, len(windows), b):
    group = windows[g:g + b]
    n = len(group)
    ids = np.full(b, -1, np.int32)
    ids[:n] = np.arange(n)
    toks = np.zeros((b, WINDOW), np.int32)
    toks[:n] = group
    cache = kvjax.init(cc)
    nll = np.zeros((b, WINDOW - 1))
    for s in range(0, WINDOW, chunk):
      num = np.where(ids >= 0, chunk, 0).astype(np.int32)
      logits, cache = decode_step(params, cache, jnp.asarray(toks[:, s:s + chunk]),
                                  jnp.asarray(ids), jnp.asarray(num), config=config,
                                  cache_config=cc)
      tgt = np.zeros((b, chunk), np.int32)
      avail = min(chunk, WINDOW - 1 - s)
      tgt[:, :avail] = toks[:, s + 1:s + 1 + avail]
      mask = np.zeros((b, chunk), bool)
      mask[:n, :avail] = True
      part = np.asarray(_nll(logits, jnp.asarray(tgt), jnp.asarray(mask)))
      nll[:, s:s + avail] = part[:, :avail]
    if int(cache.status):
      raise RuntimeError(f"cache status {kvjax.status_names(int(cache.status))}")
    out.append(nll[:n])
  return np.concatenate(out)


def greedy(params, config, cc, prompts, new_tokens: int, chunk: int) -> np.ndarray:
  """int [B, new_tokens] greedy continuations (no stop token) through the cache."""
  b = len(prompts)
  ids = np.arange(b, dtype=np.int32)
  lens = np.array([len(p) for p in prompts])
  cache = kvjax.init(cc)
  done = np.zeros(b, np.int64)
  last = np.zeros(b, np.int32)
  while np.any(done < lens):
    n = np.minimum(lens - done, chunk).astype(np.int32)
    toks = np.zeros((b, chunk), np.int32)
    for r in range(b):
      toks[r, :n[r]] = prompts[r][done[r]:done[r] + n[r]]
    logits, cache = decode_step(params, cache, jnp.asarray(toks),
                                jnp.asarray(np.where(n > 0, ids, -1).astype(np.int32)),
                                jnp.asarray(n), config=config, cache_config=cc)
    am = np.asarray(jnp.argmax(logits, axis=-1))
    for r in np.flatnonzero((n > 0) & (done + n == lens)):
      last[r] = am[r, n[r] - 1]
    done += n
  out = [last.copy()]
  for _ in range(new_tokens - 1):
    logits, cache = decode_step(params, cache, jnp.asarray(last[:, None]), jnp.asarray(ids),
                                jnp.ones(b, jnp.int32), config=config, cache_config=cc)
    last = np.asarray(jnp.argmax(logits[:, 0], axis=-1)).astype(np.int32)
    out.append(last.copy())
  if int(cache.status):
    raise RuntimeError(f"cache status {kvjax.status_names(int(cache.status))}")
  return np.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames="config")
def layer_qkv(params, tokens, config):
  """Per-layer q [L, T, N, D], k/v [L, T, K, D] of a float32 forward (RoPE'd q, k)."""
  pos = jnp.arange(tokens.shape[1])[None]

  def body(x, lp):
    def attention(q, k, v):
      return causal_attention(q, k, v), (q[0], k[0], v[0])
    return decoder_layer(lp, x, pos, attention, config)

  _, qkv = jax.lax.scan(body, params.embed[tokens], params.layers)
  return qkv


def attention_error(config, qkv, name: str, chunk: int) -> list[float]:
  """Per layer: relative error of attention through a one-layer cache of spec ``name``."""
  q, k, v = qkv
  nl, t = q.shape[0], q.shape[1]
  exact = causal_attention(q, k, v)                                  # layers as batch rows
  ks, vs, dtype = specs_of(name)
  m = -(-t // PAGE)
  prerope = name.endswith("+prerope")
  cc = kvjax.CacheConfig(num_layers=1, num_kv_heads=config.num_kv_heads,
                         head_dim=config.head_dim, page_size=PAGE, num_pages=nl * m,
                         max_seqs=nl, max_pages_per_seq=m, dtype=dtype, key_quant=ks,
                         value_quant=vs, prefix_caching=False,
                         key_rope=config.rope_base if prerope else 0.0)
  if prerope:   # the cache takes keys before RoPE: undo the forward's rotation
    k = rope(k, -jnp.broadcast_to(jnp.arange(t), (nl, t)), config.rope_base)

  @jax.jit
  def step(cache, qc, kc, vc):
    ids = jnp.arange(nl, dtype=jnp.int32)
    plan, cache = kvjax.plan_step(cache, ids, jnp.zeros((nl, chunk), jnp.int32),
                                  jnp.full((nl,), chunk, jnp.int32), config=cc)
    layer = lambda p: jax.tree.map(lambda a: a[0], p)  # noqa: E731
    out, kp, vp, _ = write_attend(qc, kc, vc, layer(cache.k), layer(cache.v), plan)
    grow = lambda p: jax.tree.map(lambda a: a[None], p)  # noqa: E731
    return out, cache.replace(k=grow(kp), v=grow(vp))

  cache = kvjax.init(cc)
  outs = []
  for s in range(0, t, chunk):
    o, cache = step(cache, q[:, s:s + chunk], k[:, s:s + chunk], v[:, s:s + chunk])
    outs.append(o)
  got = jnp.concatenate(outs, axis=1)
  err = jnp.linalg.norm((got - exact).reshape(nl, -1), axis=1) / jnp.linalg.norm(
      exact.reshape(nl, -1), axis=1)
  return [float(e) for e in err]


# ----------------------------------------------------------------------------- emulation


def _qdq_pages(x, spec, page: int):
  """float32 ``x [B, T, H, D]`` quantize-dequantized page by page (T a multiple of page)."""
  if not spec.is_quantized:
    return x
  b, t, h, d = x.shape
  pages = x.reshape(b * t // page, page, h, d)
  return quant.dequantize_pages(quant.quantize_pages(pages, spec), spec).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("config", "ks", "vs", "page", "prerope", "sink"))
def _emulated_layer(lp, x, config, ks, vs, page: int, prerope: bool, sink: int = 0):
  """One decoder layer whose attention sees K/V as a cache of (ks, vs) would store them.

  ``sink``: keys at positions below it are never quantized (an attention-sink page).
  """
  b, t = x.shape[:2]
  pos = jnp.arange(t)
  if layout.needs_staging(ks, vs):   # [query, key]: the key's page is folded for the query
    folded = ((pos[None, :] // page + 1) * page + layout.residual_tokens(ks, vs)) <= pos[:, None] + 1
  else:
    folded = jnp.ones((t, t), bool)
  folded &= pos[None, :] >= sink
  causal = pos[None, :] <= pos[:, None]

  def attention(q, k, v):
    k = k.astype(jnp.bfloat16).astype(jnp.float32)      # the cache's dtype
    v = v.astype(jnp.bfloat16).astype(jnp.float32)
    if prerope:
      pp = jnp.broadcast_to(pos[None], (b, t))
      kq = rope(_qdq_pages(rope(k, -pp, config.rope_base), ks, page), pp, config.rope_base)
    else:
      kq = _qdq_pages(k, ks, page)
    vq = _qdq_pages(v, vs, page)
    h, d = k.shape[2], k.shape[3]
    qg = q.reshape(b, t, h, q.shape[2] // h, d)
    sf = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k)
    sq = jnp.einsum("bqhgd,bkhd->bhgqk", qg, kq)
    scores = jnp.where(causal, jnp.where(folded, sq, sf) / math.sqrt(d), -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = (jnp.einsum("bhgqk,bkhd->bqhgd", jnp.where(folded, p, 0.0), vq)
           + jnp.einsum("bhgqk,bkhd->bqhgd", jnp.where(folded, 0.0, p), v))
    return out.reshape(q.shape), None

  x, _ = decoder_layer(lp, x, pos[None], attention, config)
  return x


def emulated_nll(params, config, windows: np.ndarray, layer_specs, page: int,
                 prerope: bool = False, batch: int = 2, sink: int = 0) -> np.ndarray:
  """float64 [W, WINDOW - 1] next-token NLLs of the cache-free emulation (see module doc).

  ``layer_specs``: one (key_spec, value_spec) per layer.
  """
  out = []
  for g in range(0, len(windows), batch):
    toks = jnp.asarray(windows[g:g + batch])
    x = params.embed[toks]
    for i, (ks, vs) in enumerate(layer_specs):
      lp = jax.tree.map(lambda a, i=i: a[i], params.layers)
      x = _emulated_layer(lp, x, config, ks, vs, page, prerope, sink)
    logits = lm_logits(params, x, config)[:, :-1]
    out.append(np.asarray(_nll(logits, toks[:, 1:], jnp.ones(toks[:, 1:].shape, bool)),
                          np.float64))
  return np.concatenate(out)


def layer_specs_of(name: str, num_layers: int, k4_layers=(), plain=(), edits=()):
  """Per-layer (key_spec, value_spec) of a preset, K in 4 bits in ``k4_layers``;
  ``plain`` ("k", "v"): those unquantized (the window, if any, stays with the other);
  ``edits``: ``(role, field, value)`` replacements in the K ("k") or V ("v") spec."""
  ks, vs, _ = specs_of(name)
  for role, field, value in edits:
    if role == "k":
      ks = dataclasses.replace(ks, **{field: value})
    else:
      vs = dataclasses.replace(vs, **{field: value})
  ks = layout.QuantSpec() if "k" in plain else ks
  vs = layout.QuantSpec() if "v" in plain else vs
  # (4-bit layers keep uniform levels: a 2-bit spec's levels do not fit 16 codes)
  k4 = dataclasses.replace(ks, bits=4, levels=None) if ks.is_quantized and k4_layers else ks
  return [(k4 if i in k4_layers else ks, vs) for i in range(num_layers)]


def mixed_compression(layer_specs, *, num_kv_heads: int, head_dim: int, page_size: int):
  """bf16 bytes per token over the per-layer specs' (K+V, all layers, scales included)."""
  dims = dict(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size)
  got = sum(layout.bytes_per_token(k, **dims) + layout.bytes_per_token(v, **dims)
            for k, v in layer_specs)
  return 2 * len(layer_specs) * layout.bytes_per_token(layout.QuantSpec(), **dims) / got


def parse_emulated(tag: str):
  """``preset[+k4@i.j.k][+prerope][+k16][+v16][+sinkN][+ks:field=value][+vs:...]`` ->
  (``value``: an int, a string, or a tuple of floats written ``a/b/c``)
  (preset, k4 layers, prerope, unquantized, sink tokens, spec edits).

  >>> parse_emulated("int2-r128+k4@18.7+prerope+sink32+ks:scale_dtype=bfloat16")[1:]
  ((18, 7), True, (), 32, (('k', 'scale_dtype', 'bfloat16'),))
  """
  preset, *mods = tag.split("+")
  k4, prerope, plain, sink, edits = (), False, (), 0, ()
  for m in mods:
    if m == "prerope":
      prerope = True
    elif m[:3] in ("ks:", "vs:") and "=" in m:
      field, value = m[3:].split("=", 1)
      if "/" in value:   # a tuple, e.g. ks:levels=0.13/0.39/0.61/0.87
        value = tuple(float(v) for v in value.split("/"))
      elif value.isdigit():
        value = int(value)
      edits += ((m[0], field, value),)
    elif m.startswith("sink") and m[4:].isdigit():
      sink = int(m[4:])
    elif m in ("k16", "v16"):
      plain += (m[0],)
    elif m.startswith("k4@"):
      k4 = tuple(int(i) for i in m[3:].split(".") if i)
    else:
      raise ValueError(f"--specs: unknown modifier {m!r} in {tag!r} "
                       f"(k4@i.j.k, prerope, k16, v16, sinkN, ks:f=v or vs:f=v)")
  return preset, k4, prerope, plain, sink, edits


def run_emulated(specs, config, params, windows) -> dict:
  """Rows of the cache-free emulation (``--emulate``); the bf16 row is emulated too."""
  rows = {}
  for tag in specs:
    t1 = time.perf_counter()
    name, k4, prerope, plain, sink, edits = parse_emulated(tag)
    ls = layer_specs_of(name, config.num_layers, k4, plain, edits)
    nll = emulated_nll(params, config, windows, ls, PAGE, prerope, sink=sink)
    ppl = float(math.exp(nll.mean()))
    rows[tag] = {
        "emulated": True, "key_spec": str(ls[0][0]), "value_spec": str(ls[0][1]),
        "k4_layers": list(k4), "prerope": prerope, "sink_tokens": sink,
        "cache_dtype": "bfloat16", "ppl": ppl, "agreement": None, "prefix_match": None,
        "attn_rel_err": None, "attn_rel_err_mean": None, "attn_rel_err_max": None,
        "compression": mixed_compression(ls, num_kv_heads=config.num_kv_heads,
                                         head_dim=config.head_dim, page_size=PAGE),
        "staging_bytes_per_seq": layout.staging_bytes_per_seq(
            ls[0][0], ls[0][1], num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads, head_dim=config.head_dim, page_size=PAGE),
        "seconds": time.perf_counter() - t1,
    }
    print(f"{tag}: emulated ppl {ppl:.4f}, {rows[tag]['seconds']:.0f} s", flush=True)
  return rows


def main(argv=None) -> dict:
  global PAGE   # noqa: PLW0603 (a script: the page size of this run)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="2 windows, 2 prompts x 32 tokens (an estimate, not the table)")
  ap.add_argument("--out", default="benchmarks/results/quality.json")
  ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated preset names")
  ap.add_argument("--windows", type=int, default=None, help="perplexity windows (default 16)")
  ap.add_argument("--params-dtype", choices=("float32", "bfloat16"), default="float32",
                  help="weights' dtype (bfloat16: the GPU/TPU default, compute_dtype('auto'))")
  ap.add_argument("--chunk", type=int, default=256, help="prefill tokens per step")
  ap.add_argument("--page", type=int, default=PAGE, help="page size (tokens)")
  ap.add_argument("--no-agreement", action="store_true",
                  help="skip greedy agreement (perplexity, attention error and compression only)")
  ap.add_argument("--emulate", action="store_true",
                  help="perplexity of a cache-free emulation; specs may carry +k4@i.j.k "
                       "(K of those layers in 4 bits) and +prerope (keys quantized before RoPE)")
  ap.add_argument("--table", metavar="FILE", default=None,
                  help="recompute derived fields of a results file (rewritten) and print its table")
  args = ap.parse_args(argv)
  PAGE = args.page
  if args.table:
    with open(args.table) as f:
      res = json.load(f)
    finish(res)
    with open(args.table, "w") as f:
      json.dump(res, f, indent=1)
    PAGE = res["page_size"]
    print_table(res)
    return res
  specs = [s for s in args.specs.split(",") if s]
  if "bf16" not in specs:
    specs = ["bf16"] + specs
  for s in specs:
    if args.emulate:
      s = parse_emulated(s)[0]
      if s == "float32":
        raise ValueError("--emulate: the emulation rounds K/V to bf16; 'float32' is a cache row")
    if s.removesuffix("+prerope") not in layout.PRESETS and s != "float32":
      raise ValueError(f"--specs: unknown preset {s!r}; known: {sorted(layout.PRESETS)}")
  num_windows = args.windows or (2 if args.quick else 16)
  prompts_n, new_tokens = (2, 32) if args.quick else (8, 256)
  info = common.machine()
  print("machine:", json.dumps(info), flush=True)

  t0 = time.perf_counter()
  config, params, tok = load_smollm2(args.params_dtype)
  windows = pydoc_windows(tok, WINDOW, num_windows)
  prompts = [encode_chat(tok, [{"role": "user", "content": p}]) for p in PROMPTS[:prompts_n]]
  gen_len = max(len(p) for p in prompts) + new_tokens
  qkv = layer_qkv(params, jnp.asarray(windows[:1]), config)
  print(f"loaded in {time.perf_counter() - t0:.1f} s", flush=True)

  res = {"machine": info, "quick": args.quick, "agreement": not args.no_agreement,
         "page_size": PAGE, "window": WINDOW,
         "num_windows": num_windows, "prompts": prompts_n, "new_tokens": new_tokens,
         "chunk": args.chunk, "cache_dtype": "bfloat16", "params_dtype": args.params_dtype,
         "specs": {}}
  dims = dict(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads,
              head_dim=config.head_dim, page_size=PAGE)
  if args.emulate:
    res["emulated"] = True
    res["specs"] = run_emulated(specs, config, params, windows)
    specs = []
  base_tokens = None
  for name in specs:
    ks, vs, dtype = specs_of(name)
    t1 = time.perf_counter()
    cc = cache_config(config, name, max_seqs=min(8, num_windows), max_len=WINDOW)
    nll = window_nll(params, config, cc, windows, args.chunk)
    ppl = float(math.exp(nll.mean()))
    if args.no_agreement:
      same = first_diff = None
    else:
      gcc = cache_config(config, name, max_seqs=prompts_n, max_len=gen_len)
      toks = greedy(params, config, gcc, prompts, new_tokens, args.chunk)
      if base_tokens is None:
        base_tokens = toks
      same = toks == base_tokens
      first_diff = np.where(same.all(axis=1), new_tokens, np.argmin(same, axis=1))
    errs = attention_error(config, qkv, name, args.chunk)
    row = {
        "key_spec": str(ks), "value_spec": str(vs), "cache_dtype": dtype, "ppl": ppl,
        "agreement": None if same is None else float(same.mean()),
        "prefix_match": None if same is None else float(first_diff.mean() / new_tokens),
        "attn_rel_err": errs, "attn_rel_err_mean": float(np.mean(errs)),
        "attn_rel_err_max": float(np.max(errs)),
        "compression": layout.compression(ks, vs, **dims) * (0.5 if dtype == "float32" else 1),
        "bytes_per_token": (layout.bytes_per_token(ks, **dims, dtype=dtype)
                            + layout.bytes_per_token(vs, **dims, dtype=dtype)),
        "staging_bytes_per_seq": layout.staging_bytes_per_seq(ks, vs, **dims),
        "seconds": time.perf_counter() - t1,
    }
    res["specs"][name] = row
    print(f"{name}: ppl {ppl:.4f}, agreement {_f3(row['agreement'])}, attn err "
          f"{row['attn_rel_err_mean']:.4f}, {row['seconds']:.0f} s", flush=True)
  res["total_seconds"] = time.perf_counter() - t0
  finish(res)
  if args.out:
    common.write_json(args.out, res, indent=1)
  print_table(res)
  return res


def finish(res: dict) -> None:
  """Derived fields: relative increase against bf16, targets met, top-level summaries."""
  base = res["specs"]["bf16"]["ppl"]
  for name, row in res["specs"].items():
    for key in ("ppl_target", "meets_ppl_target", "compression_target",
                "meets_compression_target"):
      row.pop(key, None)
    row["rel_ppl_increase"] = row["ppl"] / base - 1.0
    preset = name.split("+")[0]   # emulated rows: preset+k4@layers+prerope
    if preset in TARGETS:
      row["ppl_target"] = TARGETS[preset]
      row["meets_ppl_target"] = row["rel_ppl_increase"] <= TARGETS[preset]
      row["compression_target"] = COMPRESSION_TARGETS[preset]
      row["meets_compression_target"] = row["compression"] >= COMPRESSION_TARGETS[preset]
  res["ppl"] = {n: r["ppl"] for n, r in res["specs"].items()}
  res["rel_ppl_increase"] = {n: r["rel_ppl_increase"] for n, r in res["specs"].items()}
  res["compression"] = {n: r["compression"] for n, r in res["specs"].items()}


def _f3(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def _f4(x) -> str:
  return "-" if x is None else f"{x:.4f}"


def print_table(res: dict) -> None:
  greedy = (f"{res['prompts']} prompts x {res['new_tokens']} greedy tokens"
            if res.get("agreement", True) and not res.get("emulated") else "no agreement")
  how = "cache-free emulation" if res.get("emulated") else "bf16 cache"
  print(f"\nSmolLM2-135M, {res['num_windows']} x {WINDOW} tokens of pydoc_data.topics, "
        f"{greedy}, pages of {PAGE}, {how}")
  width = max(10, *(len(n) for n in res["specs"]))
  print(f"{'spec':<{width}} {'ppl':>8} {'rel_ppl':>8} {'target':>7} {'agree':>6} {'prefix':>6} "
        f"{'attn_err':>8} {'(max)':>7} {'compr':>6} {'target':>6}")
  for name, r in res["specs"].items():
    tgt = f"{r['ppl_target'] * 100:.1f}%" if "ppl_target" in r else ""
    ctg = f"{r['compression_target']:.1f}x" if "compression_target" in r else ""
    print(f"{name:<{width}} {r['ppl']:>8.4f} {r['rel_ppl_increase'] * 100:>7.2f}% {tgt:>7} "
          f"{_f3(r['agreement']):>6} {_f3(r['prefix_match']):>6} "
          f"{_f4(r['attn_rel_err_mean']):>8} {_f4(r['attn_rel_err_max']):>7} "
          f"{r['compression']:>5.2f}x {ctg:>6}")


if __name__ == "__main__":
  sys.exit(main() and 0)
