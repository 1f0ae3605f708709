"""The L2 tier (kvjax.tiers) against an independent model: a page's content is a
function of (namespace, token prefix), so every page a sequence is served, from
either tier, must hold exactly (or within the L2 spec's error bound) the content
written for that prefix.

One L1 config, one TierConfig per L2 spec and one batch shape [1, T] for the whole
module (compile once). ``KVJAX_TIERS_EXAMPLES`` / ``KVJAX_TIERS_STEPS`` scale the
stateful test up: 500 x 12 ran 1,507 sequences in 42 s (200 x 10: 467), printed at the
module's end; CI runs 4 x 8 (suite time).
"""

import dataclasses
import functools
import hashlib
import os

import hypothesis
import hypothesis.strategies as st
from hypothesis.stateful import initialize
from hypothesis.stateful import invariant
from hypothesis.stateful import precondition
from hypothesis.stateful import rule
from hypothesis.stateful import RuleBasedStateMachine
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.quant import decode_scale
from kvjax.quant import error_bound
from kvjax import tiers

S = 2           # page size
T = 8           # batch shape [1, T]
CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=S, num_pages=5,
                        max_seqs=2, max_pages_per_seq=4)
EXACT = tiers.TierConfig(l2_pages=8, l2_preset="bf16")
INT8 = tiers.TierConfig(l2_pages=8)


def content(seed, prefix) -> np.ndarray:
  """float32 [L, S, H, D]: the model's K content of the block ending ``prefix``."""
  h = hashlib.sha256(repr((tuple(int(x) for x in seed), tuple(prefix))).encode()).digest()
  rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
  return rng.standard_normal((CFG.num_layers, S, CFG.num_kv_heads, CFG.head_dim)).astype(
      np.float32) * 3


def seed_of(ts, sid):
  return np.asarray(ts.l1.seq_seed[sid])


def run_prompt(ts, sid, prompt, tc, seeds=None):
  """Attach across tiers, plan the rest of ``prompt`` into ``sid``, write the model's content
  into its full pages. Returns (cached, state)."""
  toks = np.full((1, T), 0, np.int32)
  toks[0, :len(prompt)] = prompt
  cached, ts = tiers.attach_prefix(ts, jnp.array([sid]), jnp.asarray(toks),
                                   jnp.array([len(prompt)]), seeds, config=CFG, tiers=tc)
  c = int(cached[0])
  rest = np.full((1, T), 0, np.int32)
  rest[0, :len(prompt) - c] = prompt[c:]
  ts = tiers.plan_step(ts, jnp.array([sid]), jnp.asarray(rest), jnp.array([len(prompt) - c]),
                       seeds, config=CFG, tiers=tc)
  seed = seed_of(ts, sid)
  row = np.asarray(ts.l1.page_table[sid])
  k = np.array(ts.l1.k.data)
  for j in range(c // S, len(prompt) // S):
    if row[j] >= 0:   # a refused row holds no page there (row[j] = -1 is not page -1)
      k[:, row[j]] = content(seed, prompt[:(j + 1) * S])
  return c, ts.replace(l1=ts.l1.replace(k=ts.l1.k.replace(data=jnp.asarray(k))))


def served_error(ts, sid, prompt, c):
  """Largest |page - model content| over the first ``c // S`` blocks of ``sid``."""
  seed = seed_of(ts, sid)
  row = np.asarray(ts.l1.page_table[sid])
  k = np.asarray(ts.l1.k.data)
  errs = [np.max(np.abs(k[:, row[j]] - content(seed, prompt[:(j + 1) * S])))
          for j in range(c // S)]
  return max(errs, default=0.0)


def release(ts, sid):
  return tiers.release(ts, jnp.array([sid]), config=CFG)


A = [1, 2, 3, 4, 5, 6, 7]
B = [9, 8, 7, 6, 5, 4, 3, 2]


def round_trip(tc):
  """A written, evicted from L1 by B (demoted), then attached again (promoted)."""
  ts = tiers.init(CFG, tc)
  c, ts = run_prompt(ts, 0, A, tc)
  ts = release(ts, 0)
  c, ts = run_prompt(ts, 0, B, tc)      # 4 pages + A's 3 cached > 5: A's pages leave L1
  ts = release(ts, 0)
  c, ts = run_prompt(ts, 1, A, tc)
  return c, ts


@functools.cache
def exact_round_trip():
  return round_trip(EXACT)


def test_exact_l2_round_trip_is_bit_identical():
  c, ts = exact_round_trip()
  assert c == 6                         # all 3 full blocks of A, one token left to compute
  st_ = ts.stats
  assert int(st_.l2_hit_pages) >= 1 and int(st_.promotions) >= 1
  assert int(ts.l1.stats.evictions) >= 1  # L1 did evict: the pages came back from L2
  assert served_error(ts, 1, A, c) == 0.0
  tiers.check_tiers(ts, config=CFG)


def test_int8_l2_within_error_bound():
  c, ts = round_trip(INT8)
  assert c == 6 and int(ts.stats.l2_hit_pages) >= 1
  row = np.asarray(ts.l1.page_table[1])
  copy = np.asarray(ts.l1_copy)
  spec = INT8.l2_key_quant
  for j in range(c // S):
    q = copy[row[j]]
    bound = np.asarray(error_bound(spec, decode_scale(ts.l2.k.scale[:, q], spec.scale_dtype)))
    err = np.abs(np.asarray(ts.l1.k.data[:, row[j]]) - content(seed_of(ts, 1), A[:(j + 1) * S]))
    assert np.all(err <= bound * 1.001 + 1e-6)
  assert served_error(ts, 1, A, c) > 0       # it was quantized


def test_counters_add_up():
  c, ts = exact_round_trip()
  s = ts.stats
  # three attaches: A (nothing cached), B (nothing), A (3 blocks: from L1 or L2)
  assert int(s.lookups_pages) == 3 + 3 + 3
  assert int(s.l1_hit_pages) + int(s.l2_hit_pages) == c // S
  assert int(s.l1_hit_tokens) + int(s.l2_hit_tokens) == c
  r = tiers.hit_ratios(s)
  assert r["l1"] + r["l2"] == pytest.approx(r["total"])
  assert int(s.bytes_demoted) == int(s.demotions) * 2 * S * 4 * 4  # K+V, f32, H*D = 4


def colliding_hash(parent, tokens):
  """Every block of every chain hashes the same: only verification keeps pages apart."""
  del tokens
  return jnp.ones(parent.shape, jnp.uint32) * jnp.uint32(7)


def test_colliding_hash_never_serves_another_namespace_from_l2():
  cfg = dataclasses.replace(CFG, hash_fn=colliding_hash)
  tc = EXACT
  ts = tiers.init(cfg, tc)
  a = kvjax.tenant_seed(cfg, tenant_salt="a")[None]
  b = kvjax.tenant_seed(cfg, tenant_salt="b")[None]
  toks = jnp.asarray(np.array([A + [0]], np.int32))
  _, ts = tiers.attach_prefix(ts, jnp.array([0]), toks, jnp.array([7]), a, config=cfg, tiers=tc)
  for i in range(0, 7, S):   # a page at a time: one step's colliding blocks would all lose
    chunk = jnp.asarray(np.array([A[i:i + S] + [0] * (T - len(A[i:i + S]))], np.int32))
    ts = tiers.plan_step(ts, jnp.array([0]), chunk, jnp.array([len(A[i:i + S])]), a,
                         config=cfg, tiers=tc)
  ts = tiers.release(ts, jnp.array([0]), config=cfg)
  ts = tiers.sync(ts, config=cfg, tiers=tc)
  assert int(ts.stats.demotions) >= 1
  # empty L1 of A's pages: a big other-tenant prompt takes every page
  other = jnp.asarray(np.array([B], np.int32))
  ts = tiers.plan_step(ts, jnp.array([0]), other, jnp.array([8]), b, config=cfg, tiers=tc)
  ts = tiers.release(ts, jnp.array([0]), config=cfg)
  cached, ts = tiers.attach_prefix(ts, jnp.array([1]), toks, jnp.array([7]), b, config=cfg,
                                   tiers=tc)
  assert int(cached[0]) == 0
  assert int(ts.stats.verify_failures) >= 1
  assert int(ts.stats.l2_hit_pages) == 0
  cached, ts = tiers.attach_prefix(ts, jnp.array([1]), toks, jnp.array([7]), a, config=cfg,
                                   tiers=tc)
  assert int(cached[0]) == S                 # tenant a still gets its one indexed block
  assert int(ts.stats.l1_hit_pages) + int(ts.stats.l2_hit_pages) == 1
  tiers.check_tiers(ts, config=cfg)


EXAMPLES = int(os.environ.get("KVJAX_TIERS_EXAMPLES", "4"))
STEPS = int(os.environ.get("KVJAX_TIERS_STEPS", "8"))
SEQUENCES = [0]   # sequences begun by the stateful test in this process (attach or swap-in)
SEEDS = {name: np.asarray(kvjax.tenant_seed(CFG, tenant_salt=name))[None] for name in "ab"}


def has_free(machine):
  return len(machine.live) < 2


def has_live(machine):
  return bool(machine.live)


def one_live(machine):
  return len(machine.live) == 1


class TwoTiers(RuleBasedStateMachine):
  """attach / plan / release / fork / relieve / swap on the two-tier cache; the model is the
  content function (every served page must hold its prefix's content) and the counters."""

  @initialize()
  def start(self):
    self.ts = tiers.init(CFG, EXACT)
    self.live = {}          # slot -> (prompt, tenant)
    self.served = 0         # tokens served by attaches (model of l1 + l2 hit tokens)
    self.looked = 0         # full blocks looked up

  def begin(self, sid, prompt, tenant):
    SEQUENCES[0] += 1
    c, ts = run_prompt(self.ts, sid, prompt, EXACT, jnp.asarray(SEEDS[tenant]))
    assert served_error(ts, sid, prompt, c) == 0.0
    assert c % S == 0 and c <= len(prompt) - 1
    self.served += c
    self.looked += (len(prompt) - 1) // S
    if int(ts.l1.seq_lens[sid]) == len(prompt):
      self.live[sid] = (prompt, tenant)
    else:                   # refused (out of pages): end it
      ts = release(ts, sid)
      ts = ts.replace(l1=kvjax.cache.clear_status(ts.l1))
    self.ts = ts

  def pick(self, i):
    return sorted(self.live)[i % len(self.live)]

  @precondition(has_free)
  @rule(prompt=st.lists(st.integers(1, 2), min_size=1, max_size=7),
        tenant=st.sampled_from("ab"))
  def attach_and_plan(self, prompt, tenant):
    self.begin(min({0, 1} - set(self.live)), prompt, tenant)

  @precondition(has_live)
  @rule(i=st.integers(0, 1))
  def end(self, i):
    sid = self.pick(i)
    self.ts = release(self.ts, sid)
    del self.live[sid]

  @precondition(one_live)
  @rule()
  def fork(self):
    (src, item), = self.live.items()
    self.ts = tiers.fork(self.ts, jnp.array([src]), jnp.array([1 - src]), config=CFG)
    self.live[1 - src] = item

  @rule()
  def relieve(self):
    _, self.ts = tiers.relieve(self.ts, config=CFG, tiers=EXACT)

  @precondition(has_live)
  @rule(i=st.integers(0, 1))
  def swap(self, i):
    sid = self.pick(i)
    prompt, tenant = self.live.pop(sid)
    handle, self.ts = tiers.swap_out(self.ts, sid, config=CFG, tiers=EXACT)
    assert handle[0].tolist() == list(prompt)
    self.begin(sid, list(prompt), tenant)     # swap in: attach across tiers + recompute tail

  @invariant()
  def consistent(self):
    tiers.check_tiers(self.ts, config=CFG)
    s = self.ts.stats
    assert int(s.l1_hit_tokens) + int(s.l2_hit_tokens) == self.served
    assert int(s.lookups_pages) == self.looked


TwoTiers.TestCase.settings = hypothesis.settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck))
test_two_tiers_stateful = TwoTiers.TestCase


def teardown_module():
  if os.environ.get("KVJAX_TIERS_EXAMPLES"):   # a scaled run says how many it ran
    print(f"\ntest_two_tiers_stateful: {SEQUENCES[0]} sequences over {EXAMPLES} x {STEPS}")


def test_precompile_leaves_the_promotion_nothing_to_compile(caplog):
  # tiers.precompile compiles the promotion's programs (victims, reclaim, index lookup
  # and insert) from the state's shapes in a thread; an attach that then promotes pages
  # from L2 compiles none of them again: its calls' programs are the ones precompiled.
  import logging
  import jax
  # shapes of its own (head_dim 6, 6 pages, an 8,192-slot index): no earlier test in the
  # process compiled these programs (clearing JAX's caches instead slowed the rest of the
  # worker's tests)
  cfg = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=6, page_size=S, num_pages=6,
                          max_seqs=2, max_pages_per_seq=4, index_capacity=8192)
  tc = tiers.TierConfig(l2_pages=8, l2_preset="bf16")
  names = ("jit(victims)", "jit(reclaim)", "jit(index_lookup)", "jit(index_insert)")

  def compiled(records):
    return [n for r in records for n in names if f"XLA compilation of {n}" in r.getMessage()]

  def prompt(ts, sid, toks):
    row = np.zeros((1, T), np.int32)
    row[0, :len(toks)] = toks
    ts = tiers.plan_step(ts, jnp.array([sid]), jnp.asarray(row), jnp.array([len(toks)]),
                         config=cfg, tiers=tc)
    return tiers.sync(tiers.release(ts, jnp.array([sid]), config=cfg), config=cfg, tiers=tc)

  ts = prompt(prompt(tiers.init(cfg, tc), 0, [1, 2, 3, 4, 5, 6, 7]), 0, [9, 8, 7, 6, 5, 4, 3, 2])
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      tiers.precompile(ts, config=cfg).join()
      warmed = compiled(caplog.records)
      caplog.clear()
      row = np.zeros((1, T), np.int32)
      row[0, :7] = [1, 2, 3, 4, 5, 6, 7]
      cached, ts = tiers.attach_prefix(ts, jnp.array([1]), jnp.asarray(row), jnp.array([7]),
                                       config=cfg, tiers=tc)
      again = compiled(caplog.records)
  finally:
    jax.config.update("jax_log_compiles", False)
  assert int(ts.stats.promotions) > 0 and int(ts.l1.stats.evictions) > 0   # reclaim ran
  assert set(warmed) == set(names) and again == [], (warmed, again)
  assert int(cached[0]) == 6
