"""SmolLM2 perplexity per window, ours against Hugging Face transformers on the same GGUF.

The reference for tests/test_model_smollm2.py: windows of ``--window`` tokens of
``pydoc_data.topics`` (digit-splitting tokenizer, no BOS: DESIGN.md section 8),
each scored alone by HF ``LlamaForCausalLM`` (float32, the GGUF dequantized)
and by ``kvjax.models.perplexity.window_nll``. Reported per window and over all
windows: both perplexities, their relative difference, and HF's time over ours
(same process, same machine).

  python benchmarks/perplexity_hf.py [--windows 16] [--window 1024] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from decode import hf_model  # noqa: E402


def hf_window_nll(model, ids: np.ndarray) -> np.ndarray:
  """float64 ``[num_windows, window - 1]`` next-token NLLs of HF's model, window by window."""
  import torch

  out = np.empty((ids.shape[0], ids.shape[1] - 1), np.float64)
  with torch.no_grad():
    for i, row in enumerate(ids):
      x = torch.as_tensor(row[None].astype(np.int64))
      logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
      out[i] = -logp.gather(1, x[0, 1:, None])[:, 0].numpy()
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--windows", type=int, default=16)
  ap.add_argument("--window", type=int, default=1024)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "perplexity_hf.json"))
  args = ap.parse_args()
  from kvjax.models.gguf_loader import load_smollm2
  from kvjax.models.perplexity import pydoc_windows
  from kvjax.models.perplexity import window_nll

  config, params, tok = load_smollm2()
  ids = pydoc_windows(tok, args.window, args.windows)
  model, source = hf_model(config, use_gguf=True)
  if model is None or "random" in source:
    raise SystemExit(f"HF transformers with the GGUF is needed: {source}")
  t0 = time.perf_counter()
  ours = window_nll(params, config, ids.reshape(-1), window=args.window,
                    num_windows=args.windows)
  t_ours = time.perf_counter() - t0
  t0 = time.perf_counter()
  hf = hf_window_nll(model, ids)
  t_hf = time.perf_counter() - t0
  ppl = lambda nll: [math.exp(v) for v in nll.mean(1)]   # noqa: E731
  rows = [{"window": i, "ours": a, "hf": b, "rel_diff": a / b - 1}
          for i, (a, b) in enumerate(zip(ppl(ours), ppl(hf)))]
  total = {"ours": math.exp(ours.mean()), "hf": math.exp(hf.mean())}
  total["rel_diff"] = total["ours"] / total["hf"] - 1
  for r in rows:
    print(f"window {r['window']:>2}: ours {r['ours']:.4f}  HF {r['hf']:.4f}  "
          f"rel diff {r['rel_diff']:+.2e}")
  print(f"all {args.windows} x {args.window}: ours {total['ours']:.4f}  HF {total['hf']:.4f}  "
        f"rel diff {total['rel_diff']:+.2e}; HF time over ours {t_hf / t_ours:.2f}")
  common.write_json(args.out, {"benchmark": "perplexity_hf", "machine": common.machine(),
                               "weights": source, "window": args.window,
                               "windows": rows, "all": total, "ours_s": t_ours, "hf_s": t_hf,
                               "hf_over_ours_time": t_hf / t_ours})


if __name__ == "__main__":
  main()
