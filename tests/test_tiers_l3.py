"""The L3 tier under L2 (kvjax.tiers.l3) against an independent content model: a page's
content is a function of (namespace, token prefix), so every page a sequence is served,
from any tier, must hold exactly (bf16 L3) or within the L3 spec's error bound (int4) the
content written for that prefix; a corrupted L3 page or another tenant's page is a miss.

One L1 config (5 pages), L2 of 4 pages (so L2 evicts into L3), batch shape [1, T].
"""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import tiers
from kvjax.quant import decode_scale
from kvjax.quant import error_bound
from kvjax.quant.pages import dequantize_pages
from kvjax.store import BlockStore
from kvjax.store import Prefetcher
from kvjax.store import PrefetchPolicy
from kvjax.store import StoreConfig
from kvjax.store import WritePolicy
from kvjax.tiers import l3 as l3mod

S = 2
T = 8
CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=S, num_pages=5,
                        max_seqs=2, max_pages_per_seq=4)
L2_EXACT = tiers.TierConfig(l2_pages=4, l2_preset="bf16")
L2_INT8 = tiers.TierConfig(l2_pages=4)
TESTS = str(pathlib.Path(__file__).resolve().parent)
A = [1, 2, 3, 4, 5, 6, 7]
B = [9, 8, 7, 6, 5, 4, 3, 2]


def content(seed, prefix) -> np.ndarray:
  """float32 [L, S, H, D]: the model's K content of the block ending ``prefix``."""
  h = hashlib.sha256(repr((tuple(int(x) for x in seed), tuple(prefix))).encode()).digest()
  rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
  return rng.standard_normal((CFG.num_layers, S, CFG.num_kv_heads, CFG.head_dim)).astype(
      np.float32) * 3


def make_tier(path=None, *, cfg=CFG, tc=L2_EXACT, preset="bf16", write="write_back", hits=1,
              prefetch=None):
  where = dict(path=path) if path else dict(kvstore={"driver": "memory"})
  store = BlockStore(StoreConfig(capacity=64, sync=False, **where), l3mod.l3_format(cfg, preset))
  pf = Prefetcher(store, workers=1) if prefetch else None
  conf = l3mod.L3Config(preset=preset, write=WritePolicy(write, hits=hits),
                        prefetch=PrefetchPolicy(prefetch or "best_effort"))
  return l3mod.L3Tier(store, config=cfg, tiers=tc, l3=conf, prefetcher=pf)


def new_state(tier, cfg=CFG, tc=L2_EXACT):
  return l3mod.with_l3(tiers.init(cfg, tc), tier)


SEED = np.asarray(kvjax.tenant_seed(CFG, tenant_salt="t"))[None]   # one jit signature


def run_prompt(ts, sid, prompt, tc, cfg=CFG, seeds=SEED):
  """Attach across tiers, plan the rest of ``prompt``, write the model's content into its
  new full pages. Returns (cached, state)."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  toks = np.zeros((1, T), np.int32)
  toks[0, :len(prompt)] = prompt
  cached, ts = tiers.attach_prefix(ts, jnp.array([sid]), jnp.asarray(toks),
                                   jnp.array([len(prompt)]), seeds, config=cfg, tiers=tc)
  c = int(cached[0])
  rest = np.zeros((1, T), np.int32)
  rest[0, :len(prompt) - c] = prompt[c:]
  ts = tiers.plan_step(ts, jnp.array([sid]), jnp.asarray(rest), jnp.array([len(prompt) - c]),
                       seeds, config=cfg, tiers=tc)
  seed = np.asarray(ts.l1.seq_seed[sid])
  row = np.asarray(ts.l1.page_table[sid])
  k = np.array(ts.l1.k.data)
  for j in range(c // S, len(prompt) // S):
    if row[j] >= 0:   # a refused row holds no page there (row[j] = -1 is not page -1)
      k[:, row[j]] = content(seed, prompt[:(j + 1) * S])
  return c, ts.replace(l1=ts.l1.replace(k=ts.l1.k.replace(data=jnp.asarray(k))))


def errors(ts, sid, prompt, c):
  """[|page - model content|] (arrays) of the first ``c // S`` blocks of ``sid``."""
  seed = np.asarray(ts.l1.seq_seed[sid])
  row = np.asarray(ts.l1.page_table[sid])
  k = np.asarray(ts.l1.k.data)
  return [np.abs(k[:, row[j]] - content(seed, prompt[:(j + 1) * S])) for j in range(c // S)]


def release(ts, sid, cfg=CFG):
  return tiers.release(ts, jnp.array([sid]), config=cfg)


def down_to_l3(ts, tc=L2_EXACT):
  """A written, then B (L1 evicts A into L2), then an attach of B's prefix (L2 takes B's
  pages and evicts A's into L3). Returns the state with A's blocks only in L3."""
  _, ts = run_prompt(ts, 0, A, tc)
  ts = release(ts, 0)
  _, ts = run_prompt(ts, 0, B, tc)
  ts = release(ts, 0)
  ts = tiers.sync(ts, config=CFG, tiers=tc)
  return ts


def test_bf16_l3_round_trip_is_bit_identical_and_counted():
  tier = make_tier()
  ts = down_to_l3(new_state(tier))
  assert int(ts.stats.l3_demotions) >= 3 and len(tier.store) >= 3
  c, ts = run_prompt(ts, 1, A, L2_EXACT)
  st = ts.stats
  assert c == 6
  assert int(st.l3_hit_pages) >= 1 and int(st.l3_promotions) >= int(st.l3_hit_pages)
  assert int(st.l1_hit_pages) + int(st.l2_hit_pages) + int(st.l3_hit_pages) == 3
  assert int(st.l3_hit_tokens) == S * int(st.l3_hit_pages)
  fmt = tier.store.format
  assert int(st.l3_bytes_demoted) == int(st.l3_demotions) * fmt.page_bytes
  assert int(st.l3_bytes_promoted) == int(st.l3_promotions) * fmt.page_bytes
  assert max(float(e.max()) for e in errors(ts, 1, A, c)) == 0.0
  r = tiers.hit_ratios(st)
  assert r["l1"] + r["l2"] + r["l3"] == pytest.approx(r["total"])
  tiers.check_tiers(ts, config=CFG)


def test_int4_l3_within_error_bound():
  tier = make_tier(preset="int4")
  ts = down_to_l3(new_state(tier))
  c, ts = run_prompt(ts, 1, A, L2_EXACT)
  assert c == 6 and int(ts.stats.l3_hit_pages) >= 1
  spec = tier.kspec
  row = np.asarray(ts.l1.page_table[1])
  worst = 0.0
  for j, err in enumerate(errors(ts, 1, A, c)):
    key = np.asarray(ts.l1.meta.block_hash[row[j]])[None]
    got = tier.store.get(key)
    assert got.found[0]
    bound = np.asarray(error_bound(spec, decode_scale(jnp.asarray(got.arrays["k_scale"][0]),
                                                      spec.scale_dtype)))
    assert np.all(err <= bound * 1.001 + 1e-6), (j, err.max(), bound.max())
    worst = max(worst, float(err.max()))
  assert worst > 0                      # it was quantized


def test_int8_l2_int4_l3_l1_gets_the_l3_decode():
  tier = make_tier(tc=L2_INT8, preset="int4")
  assert tier.exact_fixup
  ts = down_to_l3(new_state(tier, tc=L2_INT8), tc=L2_INT8)
  c, ts = run_prompt(ts, 1, A, L2_INT8)
  assert c == 6 and int(ts.stats.l3_hit_pages) >= 1
  row = np.asarray(ts.l1.page_table[1])
  for j in range(3 - int(ts.stats.l3_hit_pages), 3):     # the blocks L3 served
    got = tier.store.get(np.asarray(ts.l1.meta.block_hash[row[j]])[None])
    k3 = l3mod.batch_pages(got.arrays, tier.kspec, "k", 1)
    want = np.asarray(dequantize_pages(k3, tier.kspec))[:, 0]
    np.testing.assert_array_equal(np.asarray(ts.l1.k.data[:, row[j]]), want)


def test_colliding_hash_across_tenants_never_served_from_l3():
  """Tenant a's pages stored under the keys of tenant b's blocks (a hash collision for
  every block, forged in the store): b is never served them, a still is."""
  tier = make_tier(write="write_through")
  a = np.asarray(kvjax.tenant_seed(CFG, tenant_salt="a"))
  b = np.asarray(kvjax.tenant_seed(CFG, tenant_salt="b"))
  _, ts = run_prompt(new_state(tier), 0, A, L2_EXACT, seeds=jnp.asarray(a[None]))
  ts = tiers.sync(release(ts, 0), config=CFG, tiers=L2_EXACT)
  ha = tier.row_hashes(a, np.array(A), 3)
  hb = tier.row_hashes(b, np.array(A), 3)
  assert len(tier.store) == 3 and not tier.store.contains(hb).any()
  got = tier.store.get(ha)
  tier.store.put(hb, got.arrays, got.info)     # b's keys now name a's pages
  for fresh in (False, True):          # with L1/L2 holding a's pages, and from L3 alone
    if fresh:
      ts = new_state(tier)
    before = int(ts.stats.l3_verify_failures)
    c, ts = run_prompt(ts, 1, A, L2_EXACT, seeds=jnp.asarray(b[None]))
    assert c == 0 and int(ts.stats.l3_hit_pages) == 0
    assert int(ts.stats.l3_verify_failures) == before + 1
    ts = release(ts, 1)
  c, ts = run_prompt(new_state(tier), 1, A, L2_EXACT, seeds=jnp.asarray(a[None]))
  assert c == 6 and int(ts.stats.l3_hit_pages) == 3      # tenant a's own pages, from L3
  assert max(float(e.max()) for e in errors(ts, 1, A, c)) == 0.0


def test_a_corrupted_page_is_a_miss_and_recomputed(tmp_path):
  tier = make_tier(str(tmp_path / "l3"))
  ts = down_to_l3(new_state(tier))
  seg_dir = tmp_path / "l3" / "segments"
  files = [seg_dir / f for f in os.listdir(seg_dir)]
  pb = tier.store.format.page_bytes
  assert sum(p.stat().st_size for p in files) >= 3 * pb
  rng = np.random.default_rng(0)
  for path in files:                   # a flipped byte in every page of every segment
    data = bytearray(path.read_bytes())
    for at in range(0, len(data), pb):
      data[at + int(rng.integers(pb))] ^= 0xFF
    path.write_bytes(bytes(data))
  c, ts = run_prompt(ts, 1, A, L2_EXACT)
  st = ts.stats
  assert int(st.l3_hit_pages) == 0 and int(st.l3_checksum_failures) >= 1
  assert tier.store.stats()["checksum_failures"] >= 1
  # what was served came from L1/L2 and is right; the rest was recomputed
  assert all(float(e.max()) == 0.0 for e in errors(ts, 1, A, 6))


def test_restart_on_the_same_directory_serves_l3_hits(tmp_path):
  tier = make_tier(str(tmp_path / "l3"))
  down_to_l3(new_state(tier))
  n = len(tier.store)
  tier.close()
  again = make_tier(str(tmp_path / "l3"))
  assert again.store.warm_pages == n >= 3
  c, ts = run_prompt(new_state(again), 0, A, L2_EXACT)
  assert c == 6 and int(ts.stats.l3_hit_pages) == 3
  assert max(float(e.max()) for e in errors(ts, 0, A, c)) == 0.0
  tiers.check_tiers(ts, config=CFG)


def test_write_policies():
  # write_through: A's pages are in L3 as soon as they enter L2, before any L2 eviction
  tier = make_tier(write="write_through")
  _, ts = run_prompt(new_state(tier), 0, A, L2_EXACT)
  ts = tiers.sync(release(ts, 0), config=CFG, tiers=L2_EXACT)
  assert len(tier.store) == 3 and int(ts.stats.l2_evictions) == 0
  # write_back: nothing until L2 evicts
  tier = make_tier(write="write_back")
  _, ts = run_prompt(new_state(tier), 0, A, L2_EXACT)
  ts = tiers.sync(release(ts, 0), config=CFG, tiers=L2_EXACT)
  assert len(tier.store) == 0
  # selective(2): a block is written once attaches have served it twice
  tier = make_tier(write="write_through_selective", hits=2)
  ts = new_state(tier)
  sizes = []
  for sid in (0, 1, 0):
    _, ts = run_prompt(ts, sid, A, L2_EXACT)
    ts = release(ts, sid)
    sizes.append(len(tier.store))
  assert sizes == [0, 0, 3]            # served 0, 1, then 2 times
  ts = down_to_l3(ts)                  # evictions do not write under a selective policy
  assert len(tier.store) == 3


def test_prefetch_from_the_tiered_attach():
  tier = make_tier(prefetch="wait_complete")
  ts = down_to_l3(new_state(tier))
  toks = np.zeros((1, T), np.int32)
  toks[0, :len(A)] = A
  issued = tier.prefetch(ts, toks, np.array([len(A)]), SEED)
  c, ts = run_prompt(ts, 1, A, L2_EXACT)
  pst = tier.prefetcher.stats()
  assert c == 6 and issued == int(ts.stats.l3_hit_pages) >= 1
  assert pst["used"] == issued and pst["wasted"] == 0
  assert max(float(e.max()) for e in errors(ts, 1, A, c)) == 0.0
  tier.close()


FULL_DISK = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from test_tiers_l3 import A, B, L2_EXACT, down_to_l3, errors, make_tier, new_state, release, run_prompt
tier = make_tier(sys.argv[2])
ts = new_state(tier)
if sys.argv[3] == "full":
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # EFBIG instead of a signal
  resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))      # no page file fits: the disk is full
ts = down_to_l3(ts)                                        # L2 evicts A's pages into L3
out = {}
for sid, name, prompt in ((1, "B", B), (0, "A", A)):
  c, ts = run_prompt(ts, sid, prompt, L2_EXACT)
  out[name] = [c, max([float(e.max()) for e in errors(ts, sid, prompt, c)] + [0.0])]
st = ts.stats
out.update(l3_write_errors=int(st.l3_write_errors), l3_demotions=int(st.l3_demotions),
           l3_hits=int(st.l3_hit_pages), l1_l2_hits=int(st.l1_hit_pages) + int(st.l2_hit_pages),
           store=tier.store.stats())
print(json.dumps(out, default=str))
"""


def test_a_full_disk_under_l3_is_one_error_and_l1_l2_keep_serving(tmp_path):
  # the same conversation with room on the disk and with a disk on which no L3 page fits
  # (a file-size limit in a child process): one write error, L3 off, every page L1/L2
  # serve is still right, and what L3 would have served is recomputed, not lost or wrong
  procs = {mode: subprocess.Popen([sys.executable, "-c", FULL_DISK, TESTS, str(tmp_path / mode),
                                    mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for mode in ("room", "full")}   # side by side
  runs = {}
  for mode, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    runs[mode] = json.loads(stdout.strip().splitlines()[-1])
    runs[mode]["said"] = [line for line in stderr.splitlines() if "L3 store write failed" in line]
  room, full = runs["room"], runs["full"]
  assert room["l3_write_errors"] == 0 and room["l3_hits"] >= 1 and room["l3_demotions"] >= 3
  assert full["l3_write_errors"] == 1 and full["l3_demotions"] == 0 and full["l3_hits"] == 0
  s = full["store"]
  assert s["write_errors"] == 1 and s["writes_enabled"] is False and s["pages"] == 0
  assert len(full["said"]) == 1 and "too large" in full["said"][0].lower(), full["said"]
  assert room["said"] == []
  assert full["B"] == room["B"]                      # L1 / L2 serve B the same
  assert full["A"][0] <= room["A"][0] - 2            # A's L3 page recomputed
  assert full["l1_l2_hits"] >= room["l1_l2_hits"] - room["l3_hits"]
  for run in (room, full):
    assert run["A"][1] == 0.0 and run["B"][1] == 0.0   # whatever was served is right
  store = BlockStore(StoreConfig(path=str(tmp_path / "full"), capacity=64, sync=False))
  assert len(store) == 0 and store.stats()["checksum_failures"] == 0   # nothing half-listed


@pytest.mark.parametrize("tc,preset", [(L2_EXACT, "bf16"), (L2_INT8, "int4")],
                         ids=["bf16", "int8-l2-int4-l3"])
def test_a_donated_attach_is_the_attach_and_an_undonated_one_keeps_its_input(tc, preset):
  # attach_prefix(donate=True) (the host loops') updates the pools in place: the same state
  # bit for bit as the undonated call, whose input stays readable; the donated one's input
  # pools are gone (they were reused, not copied). Two identical set-ups: an attach changes
  # the store (hits, recency), so each call gets its own.
  runs = {}
  for donate in (False, True):
    tier = make_tier(tc=tc, preset=preset)
    ts = down_to_l3(new_state(tier, tc=tc), tc=tc)
    toks = np.zeros((1, T), np.int32)
    toks[0, :len(A)] = A
    before = ts
    cached, ts = tiers.attach_prefix(ts, jnp.array([1]), jnp.asarray(toks), jnp.array([len(A)]),
                                     jnp.asarray(SEED, jnp.uint32), config=CFG, tiers=tc,
                                     donate=donate)
    assert int(cached[0]) == 6 and int(ts.stats.l3_hit_pages) >= 1
    runs[donate] = (before, ts)
  (kept, plain), (gone, donated) = runs[False], runs[True]
  leaves = lambda t: jax.tree.leaves(t.replace(l3=None))   # noqa: E731
  for a, b in zip(leaves(plain), leaves(donated), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not any(x.is_deleted() for x in leaves(kept))
  assert gone.l1.k.data.is_deleted() and gone.l2.k.data.is_deleted()
  tiers.check_tiers(donated, config=CFG)
