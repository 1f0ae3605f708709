"""The ``kvjax`` command: ``kvjax demo`` (SmolLM2 chat through the cache), ``kvjax replay``.

Errors in what the user gave (arguments, trace files, a missing model package) print one
line, ``kvjax: error: <what>``, on stderr and exit with status 2, before any long work.
Only the error types for user input are caught (``UsageError`` here,
``kvjax.sim.traces.TraceError``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np

from kvjax.cache.lifecycle import release
from kvjax.cache.state import init
from kvjax.cache.status import CacheStatusError
from kvjax.cache.status import check_status
from kvjax.cache.status import OUT_OF_PAGES
from kvjax.cliutil import ArgumentParser
from kvjax.cliutil import check_memory
from kvjax.cliutil import enable_compile_cache
from kvjax.cliutil import is_off
from kvjax.cliutil import nonnegative_int
from kvjax.cliutil import positive_int
from kvjax.cliutil import UsageError
from kvjax.cliutil import user_cache_dir
from kvjax.models import chat_prompt
from kvjax.models import generate
from kvjax.models import IM_END_ID
from kvjax.models import load_smollm2
from kvjax.models import prefill
from kvjax.models.gguf_loader import WeightsNotInstalledError
from kvjax.models.llama import compute_dtype
from kvjax.models.swap import ATTACH_MIN
from kvjax.sim import cli as sim_cli
from kvjax.store import BlockStore
from kvjax.store import StoreBusyError
from kvjax.store import StoreConfig
from kvjax.store import WritePolicy
from kvjax import tiers as kvtiers
from kvjax.tiers import l3 as l3mod
from kvjax.xla_cpu import enable_loop_kernels

SYSTEM_PROMPT = ("You are a concise, helpful assistant. Answer in one or two sentences, "
                 "plainly and correctly.")

CONVERSATIONS = [
    ["What is the capital of France?", "And what river flows through it?"],
    ["Name three primary colors.", "Which of them is a warm color?"],
    ["What does a CPU do in a computer?", "What about a GPU?"],
    ["Give me a synonym for happy.", "Use it in a short sentence."],
]

# ``--kv-dtype auto`` stores pages in the dtype the model runs in (``--dtype``: bfloat16 on
# GPU/TPU, float32 on CPU), as vLLM's ``kv_cache_dtype="auto"`` takes the model's dtype. Not
# the checkpoint's bfloat16 on CPU: XLA:CPU has no bfloat16 scatter, and a decode step writing
# bfloat16 pages cost 8-30x a float32 one there (SmolLM2, batch 4, 256 pages: 0.55-2.1 s
# against 0.07 s; it grows with the pool). The GGUF shipped here is Q4_1, dequantized.
KV_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEMO_MAX_LEN = 1024  # tokens per sequence the demo's page table allows
DEMO_L2_PAGES = 256  # --l2-pages' default: the demo runs the tier hierarchy, L1 / L2 / L3
DEMO_L3_PAGES = 4096  # --l3-pages' default
L3_DIR_ENV = "KVJAX_L3_DIR"  # the default L3's parent folder, or "off"


# --- kvjax demo: accounting --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepTime:
  """One timed step of the demo: a prefill (with its first token) or a decode step."""

  kind: str     # "prefill" or "decode"
  shape: str    # the compiled shape, e.g. "4x64"; the first step of a shape compiles it
  seconds: float
  tokens: int   # prompt tokens computed (prefill) or tokens generated (decode)


def timing_report(steps: Sequence[StepTime]) -> dict:
  """Compilation apart from steady-state throughput.

  The first step of each ``(kind, shape)`` includes its compilation: it counts as warm-up.
  Every later step counts toward the steady-state rates.

  Returns:
    dict with ``warmup_s`` (the first step of each shape, summed), ``warmup`` (``{"kind
    shape": seconds}``), ``prefill_tokens``/``prefill_s``/``prefill_per_s`` and
    ``decode_tokens``/``decode_s``/``decode_per_s`` over the steady steps (rates None
    when there is no steady step of that kind).

  >>> r = timing_report([StepTime("decode", "4x1", 9.0, 4), StepTime("decode", "4x1", 0.5, 4)])
  >>> r["warmup_s"], r["decode_per_s"]
  (9.0, 8.0)
  """
  seen, warmup = set(), {}
  sums = {"prefill": [0, 0.0], "decode": [0, 0.0]}
  for s in steps:
    key = (s.kind, s.shape)
    if key not in seen:
      seen.add(key)
      warmup[f"{s.kind} {s.shape}"] = warmup.get(f"{s.kind} {s.shape}", 0.0) + s.seconds
      continue
    sums[s.kind][0] += s.tokens
    sums[s.kind][1] += s.seconds
  out = {"warmup_s": sum(warmup.values()), "warmup": warmup}
  for kind, (tokens, seconds) in sums.items():
    out[f"{kind}_tokens"], out[f"{kind}_s"] = tokens, seconds
    out[f"{kind}_per_s"] = tokens / seconds if seconds > 0 else None
  return out


class DemoMeter:
  """Times the demo's ``generate`` calls and drives its progress bar.

  The bar's total starts at ``max_new_tokens`` per reply; when a call returns, replies
  that stopped early shrink it to what was generated, so the bar ends at 100 %.

  Args:
    planned: tokens the bar starts from (calls * rows * max_new_tokens).
    bar: a ``tqdm`` bar (or None).
    clock: seconds now (``time.perf_counter``; tests pass a fake).
  """

  def __init__(self, planned: int, bar=None, clock: Callable[[], float] = time.perf_counter):
    self.steps: list[StepTime] = []
    self.bar, self.clock = bar, clock
    self.planned, self.generated, self.ttft = planned, 0, []
    self.first_token_at = None   # clock() when the first generated token came
    self._call = None

  def prefill(self, shape: str, seconds: float, tokens: int) -> None:
    """Record a prefill timed by the caller (one without generation)."""
    self.steps.append(StepTime("prefill", shape, seconds, tokens))

  def start_call(self, *, prefill_shape: str, decode_shape: str, budget: int) -> None:
    """Before a ``generate`` call that may generate up to ``budget`` tokens."""
    self._call = dict(prefill_shape=prefill_shape, decode_shape=decode_shape, budget=budget,
                      last=self.clock(), n=0, prefill_step=None)

  def on_step(self, n: int) -> None:
    """``generate``'s ``on_step``: the first call ends the prefill, later ones a decode step."""
    c, now = self._call, self.clock()
    seconds, c["last"] = now - c["last"], now
    if self.first_token_at is None:
      self.first_token_at = now
    if c["n"] == 0:
      c["prefill_step"] = len(self.steps)
      self.steps.append(StepTime("prefill", c["prefill_shape"], seconds, 0))
      self.ttft.append(seconds)
    else:
      self.steps.append(StepTime("decode", c["decode_shape"], seconds, n))
    c["n"] += 1
    if self.bar is not None:
      self.bar.update(n)

  def end_call(self, generated: int, prompt_tokens: int) -> None:
    """After the call: the tokens it returned and the prompt tokens its prefill computed.

    The bar's total drops what the call could have generated but did not.
    """
    i = self._call["prefill_step"]
    if i is not None:
      self.steps[i] = dataclasses.replace(self.steps[i], tokens=prompt_tokens)
    self.generated += generated
    self.planned -= self._call["budget"] - generated
    self._call = None
    if self.bar is not None:
      self.bar.total = self.planned
      self.bar.n = self.generated
      self.bar.refresh()

  def report(self) -> dict:
    """``timing_report`` of the steps, with the times to first token."""
    return dict(timing_report(self.steps), ttft_s=list(self.ttft))


# --- kvjax demo ----------------------------------------------------------------------------


def _demo_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--max-new-tokens", type=positive_int, default=40,
                      help="per reply (default 40)")
  parser.add_argument("--page-size", type=positive_int, default=16)
  parser.add_argument("--num-pages", type=positive_int, default=256)
  parser.add_argument("--turns", type=positive_int, default=2, help="user turns per conversation")
  parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="auto",
                      help="page dtype; auto: the weights' dtype (--dtype)")
  parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                      help="weights' dtype; auto: bfloat16 on GPU/TPU, float32 on CPU (where "
                           "XLA upcasts bfloat16 matmuls and they run slower)")
  parser.add_argument("--json", default=None, metavar="FILE",
                      help="also write the run's figures (times, tokens/s, pages) to FILE")
  parser.add_argument("--l2-pages", type=nonnegative_int, default=DEMO_L2_PAGES,
                      help=f"the tiered cache's L2: N pages (unquantized, as L1) under the "
                           f"pool; a conversation the pool refuses swaps out the latest one "
                           f"instead of failing (default {DEMO_L2_PAGES}; 0: no tiers, the "
                           "plain cache, and no L3)")
  parser.add_argument("--l3-dir", default=None, metavar="DIR",
                      help="the persistent L3 under L2: pages written through, unquantized, "
                           "kept across runs, so a later run serves its prompts' cached "
                           "prefixes from DIR (default: a folder per cache format under "
                           f"${L3_DIR_ENV}, else ~/.cache/kvjax/l3; 'off': no L3)")
  parser.add_argument("--l3-pages", type=positive_int, default=DEMO_L3_PAGES,
                      help=f"L3 capacity in pages (default {DEMO_L3_PAGES})")


def _check_demo_args(args) -> None:
  """UsageError for demo arguments that no model can serve (checked before loading one)."""
  l3_dir = getattr(args, "l3_dir", None)
  if l3_dir is not None and not is_off(l3_dir) and not getattr(args, "l2_pages", 0):
    raise UsageError("needs --l2-pages (L3 lies under L2)", argument="--l3-dir")
  if args.page_size > DEMO_MAX_LEN:
    raise UsageError(f"must be at most {DEMO_MAX_LEN} (the demo's sequence length), got "
                     f"{args.page_size}", argument="--page-size")


def demo_l3_dir(args, cc) -> tuple:
  """``(folder of the demo's L3 or None, whether it is the default one)``.

  ``--l3-dir DIR`` as given; ``off``, or no L2, none; by default a folder named by the
  cache format (model dims, dtype, page size, capacity: one ``BlockStore`` format each, so a run
  with other page arguments starts its own store instead of failing on the last one's)
  under ``$KVJAX_L3_DIR`` (``off``: none) or ``~/.cache/kvjax/l3``.

  >>> import argparse, os
  >>> from unittest import mock
  >>> from kvjax.models.llama import LlamaConfig
  >>> cc = LlamaConfig.small().cache_config(page_size=16, num_pages=8, max_seqs=1,
  ...                                       max_pages_per_seq=2)
  >>> a = argparse.Namespace(l2_pages=256, l3_dir=None, l3_pages=4096)
  >>> with mock.patch.dict(os.environ, {"KVJAX_L3_DIR": "/tmp/l3"}):
  ...   demo_l3_dir(a, cc)
  ('/tmp/l3/2x2x16-float32-page16-4096', True)
  >>> demo_l3_dir(argparse.Namespace(l2_pages=0, l3_dir=None, l3_pages=4096), cc)
  (None, False)
  """
  l3_dir = getattr(args, "l3_dir", None)
  if not getattr(args, "l2_pages", 0) or is_off(l3_dir):
    return None, False
  if l3_dir is not None:
    return l3_dir, False
  root = user_cache_dir(L3_DIR_ENV, "l3")
  if root is None:
    return None, False
  dims = f"{cc.num_layers}x{cc.num_kv_heads}x{cc.head_dim}"   # layers x kv heads x head dim
  return os.path.join(root, f"{dims}-{cc.dtype}-page{cc.page_size}-{args.l3_pages}"), True


def demo_cache_config(config, args, max_seqs: int):
  """The demo's ``CacheConfig`` (pages in the weights' dtype for ``--kv-dtype auto``)."""
  _check_demo_args(args)
  try:
    return config.cache_config(page_size=args.page_size, num_pages=args.num_pages,
                               max_seqs=max_seqs, max_pages_per_seq=DEMO_MAX_LEN // args.page_size,
                               dtype=args.kv_dtype, model_dtype=compute_dtype(args.dtype))
  except ValueError as e:  # CacheConfig validation of the page arguments
    raise UsageError(f"invalid cache: {e}") from None


def _cache_bytes(cache_config, tier_config=None) -> int:
  """Bytes of ``kvjax.init(cache_config)`` (or the tiered cache), from shapes only (nothing
  allocated)."""
  shapes = jax.eval_shape(lambda: init(cache_config) if tier_config is None
                          else kvtiers.init(cache_config, tier_config))
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes))


DEMO_L2_PRESET = "bf16"   # --l2-pages: L2 pages unquantized, in L1's dtype (a bit-exact swap)


def demo_l3(cache, cc, tc, path: str, pages: int, default: bool = False):
  """``cache`` with a persistent L3 in ``path`` under its L2: pages unquantized (the L2
  preset: a page read back is the page written) and written through as they enter L2.
  Returns ``(cache, tier)``; a directory holding another model's or size's store is a
  ``UsageError``, as is one another run has open (``StoreBusyError``) or one that cannot
  be made or written, except for the ``default`` folder: the run then goes on without L3
  (``tier`` None) and says so."""
  try:
    store = BlockStore(StoreConfig(path=path, capacity=pages),
                       l3mod.l3_format(cc, DEMO_L2_PRESET))
  except StoreBusyError:
    if not default:
      raise UsageError(f"cannot use {path!r}: another run has it open; give another "
                       "--l3-dir or --l3-dir off", argument="--l3-dir") from None
    print(f"L3: {path} is open in another run; this one goes without L3")
    return cache, None
  except ValueError as e:   # the directory holds a store of another format or capacity
    raise UsageError(f"cannot use {path!r}: {e}", argument="--l3-dir") from None
  except OSError as e:
    if default:   # the default folder cannot be made or written: the run goes on without
      print(f"L3: cannot use {path} ({e.strerror or e}); this run goes without L3")
      return cache, None
    raise UsageError(f"cannot use {path!r}: {e.strerror or e}", argument="--l3-dir") from None
  tier = l3mod.L3Tier(store, config=cc, tiers=tc,
                      l3=l3mod.L3Config(preset=DEMO_L2_PRESET,
                                        write=WritePolicy("write_through")))
  return l3mod.with_l3(cache, tier), tier


def demo(args) -> dict:
  """Multi-turn chats with a shared system prompt, batched through the paged cache."""
  from tqdm import tqdm

  _check_demo_args(args)
  json_path = getattr(args, "json", None)
  if json_path:   # a path that cannot be written fails now, not after the run
    _write_json(json_path, {})
  t0 = time.perf_counter()
  try:
    config, params, tokenizer = load_smollm2(args.dtype)
  except WeightsNotInstalledError as e:
    raise UsageError(f"demo: {e}") from None
  load_s = time.perf_counter() - t0
  convs = CONVERSATIONS
  turns = min(args.turns, min(len(c) for c in convs))
  cc = demo_cache_config(config, args, len(convs))
  l2 = getattr(args, "l2_pages", 0) or None   # 0: the plain cache
  tc = None if l2 is None else kvtiers.TierConfig(l2_pages=l2, l2_preset=DEMO_L2_PRESET)
  check_memory(_cache_bytes(cc, tc), f"a cache of {cc.num_pages} pages of {cc.page_size} tokens"
               + ("" if tc is None else f" and an L2 of {l2}"),
               "--num-pages" if tc is None else "--num-pages / --l2-pages")
  cache = init(cc) if tc is None else kvtiers.init(cc, tc)
  # tiered: the promotion's programs compile beside the load and the first prefill (a run
  # whose L3 is empty never calls them, and the next one paid for them before its first token)
  warming = None if tc is None else kvtiers.precompile(
      cache, config=cc, donate=True, attach=(len(convs), ATTACH_MIN))
  (l3_dir, default_l3), tier = demo_l3_dir(args, cc), None
  if l3_dir is not None:
    cache, tier = demo_l3(cache, cc, tc, l3_dir, args.l3_pages, default_l3)
  seq_ids = list(range(len(convs)))
  b, chunk = len(convs), 64  # generate's default chunk_size: prefill steps are [B, 64]
  print(f"SmolLM2-135M-Instruct ({params.embed.dtype.name} weights) loaded in {load_s:.1f}s; "
        f"cache: {cc.num_pages} pages of "
        f"{cc.page_size} tokens ({cc.dtype})"
        + ("" if tc is None else f" + L2 {l2} pages (swap instead of refusal)")
        + ("" if tier is None else f" + L3 {args.l3_pages} pages in {l3_dir} "
           f"({tier.store.warm_pages} from earlier runs)")
        + f", {len(convs)} conversations x {turns} turns, backend {jax.default_backend()}")
  histories = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in convs]
  last_tokens = [None] * len(convs)
  conv_ids = [[] for _ in convs]   # tiered: every token of each conversation so far
  prefilled = 0
  peak_pages = 0
  bar = tqdm(total=turns * b * args.max_new_tokens, unit="tok", desc="generating")
  meter = DemoMeter(turns * b * args.max_new_tokens, bar)
  t_start = time.perf_counter()
  # The shared system prompt is computed once; its full pages stay cached after
  # release, and every conversation attaches them instead of recomputing.
  system_ids = tokenizer.encode(chat_prompt(histories[0], add_generation_prompt=False),
                                add_special_tokens=False).ids
  # In the turns' [B, 64] step shape (padding rows), so that the first token waits for one
  # prefill shape to be traced and loaded, not two.
  t = time.perf_counter()
  _, cache = prefill(params, cache, [system_ids], [0], config=config, cache_config=cc, tiers=tc,
                     pad_rows=b)
  meter.prefill(f"{b}x{chunk}", time.perf_counter() - t, len(system_ids))
  cache = (release(cache, np.array([0], np.int32), config=cc) if tc is None
           else kvtiers.release(cache, np.array([0], np.int32), config=cc))
  prefix_stats = {}
  for turn in range(turns):
    prompts = []
    for i, conv in enumerate(convs):
      histories[i].append({"role": "user", "content": conv[turn]})
      if turn == 0:
        ids = tokenizer.encode(chat_prompt(histories[i]), add_special_tokens=False).ids
      else:  # continue the cached sequence: the last reply token, then the new user turn
        text = chat_prompt(histories[i][-1:], default_system=None)
        ids = [last_tokens[i]] + tokenizer.encode("\n" + text, add_special_tokens=False).ids
      if tc is not None:   # tiered generate released the sequence: the whole conversation
        ids = conv_ids[i][:-1] + ids   # (its cached pages come back from L1 / L2)
      prompts.append(ids)
    prefilled += sum(len(p) for p in prompts)
    computed = prefix_stats.get("computed", 0)
    meter.start_call(prefill_shape=f"{b}x{chunk}", decode_shape=f"{b}x1",
                     budget=b * args.max_new_tokens)
    try:
      outs, cache = generate(params, cache, prompts, seq_ids, config=config, cache_config=cc,
                             max_new_tokens=args.max_new_tokens, on_step=meter.on_step,
                             stats=prefix_stats, tiers=tc)
    except CacheStatusError as e:
      bar.close()
      raise UsageError(f"the cache ran out: {e}; give more --num-pages or fewer "
                       "--max-new-tokens") from None
    cut = {i: out.finish_reason for i, out in enumerate(outs)
           if out.finish_reason not in ("stop", "length")}
    if cut:
      bar.close()
      raise UsageError(f"the cache could not finish conversations {cut}; give more --num-pages "
                       "or fewer --max-new-tokens")
    meter.end_call(sum(len(out) for out in outs), prefix_stats.get("computed", 0) - computed)
    l1 = cache if tc is None else cache.l1   # tiered: rows released, pages cached
    peak_pages = max(peak_pages, int(np.sum(np.asarray(l1.meta.ref_count if tc is None
                                                       else l1.meta.filled) > 0)))
    for i, out in enumerate(outs):
      last_tokens[i] = out[-1]
      conv_ids[i] = prompts[i] + list(out)
      reply = tokenizer.decode([t for t in out if t != IM_END_ID], skip_special_tokens=True)
      histories[i].append({"role": "assistant", "content": reply.strip()})
  bar.close()
  wall = time.perf_counter() - t_start
  if tier is not None:   # what L1 caches goes down through L2 into L3 (written through)
    cache = kvtiers.sync(cache, config=cc, tiers=tc)
    tier.close()
  l1 = cache if tc is None else cache.l1
  if tc is None:
    check_status(l1)
  elif int(l1.status) & ~OUT_OF_PAGES:   # tiered: a refusal was answered with a swap
    check_status(l1.replace(status=l1.status & ~OUT_OF_PAGES))
  stats = l1.stats
  timing = meter.report()
  generated = meter.generated
  print()
  for i, h in enumerate(histories):
    print(f"--- conversation {i}")
    for m in h[1:]:
      print(f"{m['role']:>9}: {m['content']}")
  result = {
      "generated_tokens": generated, "prefill_tokens": prefilled, "wall_s": wall,
      "kv_dtype": cc.dtype, "warmup_s": timing["warmup_s"], "warmup": timing["warmup"],
      "ttft_s": timing["ttft_s"], "decode_tokens_per_s": timing["decode_per_s"],
      "first_token_s": meter.first_token_at - t0,
      # wall-clock time of the first token, for a caller timing from the process's launch
      "first_token_unix": time.time() - (time.perf_counter() - meter.first_token_at),
      "load_s": load_s,
      "prefill_tokens_per_s": timing["prefill_per_s"],
      "peak_pages_used": peak_pages, "num_pages": cc.num_pages,
      "pages_allocated": int(stats.pages_allocated), "steps": int(stats.steps),
      "prompt_tokens_reused": prefix_stats.get("reused", 0),
      "prompt_tokens_computed": prefix_stats.get("computed", 0),
  }
  if tc is not None:
    ts = cache.stats
    result.update(l2_pages=l2, swaps_out=int(ts.swaps_out), swaps_in=int(ts.swaps_in),
                  tokens_recomputed=prefix_stats.get("recomputed", 0),
                  demotions=int(ts.demotions), promotions=int(ts.promotions),
                  l2_hit_pages=int(ts.l2_hit_pages))
  if tier is not None:
    result.update(l3_dir=l3_dir, l3_pages=args.l3_pages, l3_warm_pages=tier.store.warm_pages,
                  l3_hit_pages=int(cache.stats.l3_hit_pages),
                  l3_pages_stored=len(tier.store), l3_write_errors=int(cache.stats.l3_write_errors))
  print(f"\nfirst token {result['first_token_s']:.1f}s after the demo started (model load "
        f"{load_s:.1f}s)")
  print(f"{generated} tokens generated, {prefilled} prompt tokens in {wall:.1f}s, of which "
        f"{timing['warmup_s']:.1f}s warm-up: the first step of each shape, compilation "
        "included (" + ", ".join(f"{k} {v:.1f}s" for k, v in timing["warmup"].items()) + ")")
  rate = lambda r: "n/a" if r is None else f"{r:.1f} tokens/s"  # noqa: E731
  print(f"steady state: decode {rate(timing['decode_per_s'])} ({b} rows; "
        f"{timing['decode_tokens']} tokens in {timing['decode_s']:.1f}s), prefill "
        f"{rate(timing['prefill_per_s'])} (later turns); time to first token per turn: "
        + ", ".join(f"{s:.2f}s" for s in timing["ttft_s"]))
  print(f"prefix cache: {result['prompt_tokens_reused']} prompt tokens reused from cached "
        f"pages, {result['prompt_tokens_computed']} computed")
  print(f"pages used: peak {peak_pages} of {cc.num_pages} ({peak_pages * cc.page_size} token "
        f"slots, {cc.dtype}); {result['pages_allocated']} allocations over {result['steps']} "
        "steps")
  if tc is not None:
    print(f"swap: {result['swaps_out']} conversations swapped out to L2 and {result['swaps_in']} "
          f"back in ({result['tokens_recomputed']} tokens recomputed); L2 ({l2} pages): "
          f"{result['demotions']} pages demoted, {result['promotions']} promoted, "
          f"{result['l2_hit_pages']} prompt pages served from L2")
  if tier is not None:
    print(f"L3 ({l3_dir}): {result['l3_hit_pages']} prompt pages served from it "
          f"({result['l3_warm_pages']} pages there from earlier runs), "
          f"{result['l3_pages_stored']} stored now "
          "for the next run")
  if json_path:
    _write_json(json_path, result)
  if warming is not None:
    warming.join()   # what it compiled is in the persistent cache for the next run
  return result


def _write_json(path: str, obj) -> None:
  try:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1, default=float)
  except OSError as e:
    raise UsageError(f"--json: cannot write {path!r}: {e.strerror or e}") from None


# --- entry point ---------------------------------------------------------------------------


def _fail(error: Exception) -> int:
  print(f"kvjax: error: {error}", file=sys.stderr)
  return 2


def _replay(argv: list[str]) -> int:

  try:
    return sim_cli.main(argv) or 0
  except sim_cli.TraceError as e:
    return _fail(e)


def main(argv=None) -> int:
  """Entry point of the ``kvjax`` console script; 2 (and one line on stderr) on bad input."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = ArgumentParser(prog="kvjax", description="kvjax: a functional paged KV cache")
  sub = parser.add_subparsers(dest="command", required=True)
  _demo_args(sub.add_parser("demo", help="SmolLM2 multi-turn chat through the paged cache"))
  sub.add_parser("replay", help="replay a request trace through the cache simulator",
                 add_help=False)
  enable_loop_kernels()    # before JAX starts: scans compile to one kernel (kvjax.xla_cpu)
  enable_compile_cache()   # compiled step shapes are reused by the next run
  try:
    if argv[:1] == ["replay"]:
      return _replay(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
      demo(args)
  except UsageError as e:
    return _fail(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
