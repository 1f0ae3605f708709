"""The ``kvjax`` command: ``kvjax demo`` (SmolLM2 chat through the cache), ``kvjax replay``."""

from __future__ import annotations

import argparse
import sys
import time

SYSTEM_PROMPT = ("You are a concise, helpful assistant. Answer in one or two sentences, "
                 "plainly and correctly.")

CONVERSATIONS = [
    ["What is the capital of France?", "And what river flows through it?"],
    ["Name three primary colors.", "Which of them is a warm color?"],
    ["What does a CPU do in a computer?", "What about a GPU?"],
    ["Give me a synonym for happy.", "Use it in a short sentence."],
]


def _demo_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--max-new-tokens", type=int, default=40, help="per reply (default 40)")
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--num-pages", type=int, default=256)
  parser.add_argument("--turns", type=int, default=2, help="user turns per conversation")


def demo(args) -> dict:
  """Multi-turn chats with a shared system prompt, batched through the paged cache."""
  import numpy as np
  from tqdm import tqdm

  import kvjax
  from kvjax.models import IM_END_ID
  from kvjax.models import chat_prompt
  from kvjax.models import generate
  from kvjax.models import load_smollm2
  from kvjax.models import prefill

  t0 = time.perf_counter()
  config, params, tokenizer = load_smollm2()
  load_s = time.perf_counter() - t0
  convs = CONVERSATIONS
  turns = max(1, min(args.turns, min(len(c) for c in convs)))
  max_len = 64 * 16  # tokens per sequence the table allows
  cc = config.cache_config(page_size=args.page_size, num_pages=args.num_pages,
                           max_seqs=len(convs), max_pages_per_seq=max_len // args.page_size)
  cache = kvjax.init(cc)
  seq_ids = list(range(len(convs)))
  print(f"SmolLM2-135M-Instruct loaded in {load_s:.1f}s; cache: {cc.num_pages} pages of "
        f"{cc.page_size} tokens, {len(convs)} conversations x {turns} turns, "
        f"backend {__import__('jax').default_backend()}")
  histories = [[{"role": "system", "content": SYSTEM_PROMPT}] for _ in convs]
  last_tokens = [None] * len(convs)
  generated = prefilled = 0
  peak_pages = 0
  t_start = time.perf_counter()
  # The shared system prompt is computed once; its full pages stay cached after
  # release, and every conversation attaches them instead of recomputing.
  system_ids = tokenizer.encode(chat_prompt(histories[0], add_generation_prompt=False),
                                add_special_tokens=False).ids
  _, cache = prefill(params, cache, [system_ids], [0], config=config, cache_config=cc)
  cache = kvjax.release(cache, np.array([0], np.int32))
  prefix_stats = {}
  bar = tqdm(total=turns * len(convs) * args.max_new_tokens, unit="tok", desc="generating")
  for turn in range(turns):
    prompts = []
    for i, conv in enumerate(convs):
      histories[i].append({"role": "user", "content": conv[turn]})
      if turn == 0:
        ids = tokenizer.encode(chat_prompt(histories[i]), add_special_tokens=False).ids
      else:  # continue the cached sequence: the last reply token, then the new user turn
        text = chat_prompt(histories[i][-1:], default_system=None)
        ids = [last_tokens[i]] + tokenizer.encode("\n" + text, add_special_tokens=False).ids
      prompts.append(ids)
    prefilled += sum(len(p) for p in prompts)

    def on_step(n):
      bar.update(n)

    outs, cache = generate(params, cache, prompts, seq_ids, config=config, cache_config=cc,
                               max_new_tokens=args.max_new_tokens, on_step=on_step,
                               stats=prefix_stats)
    peak_pages = max(peak_pages, int(np.sum(np.asarray(cache.meta.ref_count) > 0)))
    for i, out in enumerate(outs):
      generated += len(out)
      last_tokens[i] = out[-1]
      reply = tokenizer.decode([t for t in out if t != IM_END_ID], skip_special_tokens=True)
      histories[i].append({"role": "assistant", "content": reply.strip()})
  bar.close()
  wall = time.perf_counter() - t_start
  kvjax.check_status(cache)
  stats = cache.stats
  print()
  for i, h in enumerate(histories):
    print(f"--- conversation {i}")
    for m in h[1:]:
      print(f"{m['role']:>9}: {m['content']}")
  result = {
      "generated_tokens": generated, "prefill_tokens": prefilled, "wall_s": wall,
      "tokens_per_s": (generated + prefilled) / wall, "generated_per_s": generated / wall,
      "peak_pages_used": peak_pages, "num_pages": cc.num_pages,
      "pages_allocated": int(stats.pages_allocated), "steps": int(stats.steps),
      "prompt_tokens_reused": prefix_stats.get("reused", 0),
      "prompt_tokens_computed": prefix_stats.get("computed", 0),
  }
  print(f"\n{generated} tokens generated, {prefilled} prompt tokens in {wall:.1f}s: "
        f"{result['generated_per_s']:.1f} generated tokens/s, {result['tokens_per_s']:.1f} "
        f"tokens/s in all")
  print(f"prefix cache: {result['prompt_tokens_reused']} prompt tokens reused from cached "
        f"pages, {result['prompt_tokens_computed']} computed")
  print(f"pages used: peak {peak_pages} of {cc.num_pages} ({peak_pages * cc.page_size} token "
        f"slots); {result['pages_allocated']} allocations over {result['steps']} steps")
  return result


def main(argv=None) -> int:
  """Entry point of the ``kvjax`` console script."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="kvjax", description="kvjax: a functional paged KV cache")
  sub = parser.add_subparsers(dest="command", required=True)
  _demo_args(sub.add_parser("demo", help="SmolLM2 multi-turn chat through the paged cache"))
  sub.add_parser("replay", help="replay a request trace through the cache simulator",
                 add_help=False)
  if argv[:1] == ["replay"]:
    try:
      from kvjax.sim import cli as sim_cli
    except ImportError as e:  # pragma: no cover - the simulator ships with the package
      raise SystemExit(f"kvjax replay is unavailable: {e}")
    return sim_cli.main(argv[1:]) or 0
  args = parser.parse_args(argv)
  if args.command == "demo":
    demo(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
