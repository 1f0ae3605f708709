"""Stateful property test: tenants, non-finite writes, refusals, releases, forks and prefix
attaches, interleaved in any order, against a plain-Python model of the cache.

Every token's K/V is a function of (tenant, the sequence's tokens up to it), computed on
the host: a page shared correctly (same tenant, same prefix) holds exactly the values the
model expects, and a page of another tenant does not. Token ``POISON`` writes NaN K/V.
After every rule, for every live sequence:

- its length, pages and K/V equal the model's (NaN exactly where it wrote or attached
  poison), and every page it holds carries its tenant's namespace;
- what ``attach_prefix`` attached was computed by a sequence of the same tenant;
- attention over its pages equals a numpy reference over the model's K/V: finite unless
  its own history holds poison, whatever NaN other sequences left in shared, stale or
  unused pages (page 0 included): no sequence's output changes because of another's data;
- ``NON_FINITE`` is flagged for the sequences that wrote poison (or were forked from one);
- reference counts equal the number of live sequences holding each page.
"""

import functools
import zlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import invariant
from hypothesis.stateful import rule
from hypothesis.stateful import run_state_machine_as_test

import kvjax
from kvjax import pressure
from kvjax.cache.plan import StepPlan

CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=10,
                        max_seqs=4, max_pages_per_seq=4)
S, P, B, M = CFG.page_size, CFG.num_pages, CFG.max_seqs, CFG.max_pages_per_seq
W = S * M                   # widest prompt
POISON = 9
TENANTS = {"default": None, "a": kvjax.tenant_seed(CFG, tenant_salt="a"),
           "b": kvjax.tenant_seed(CFG, tenant_salt="b")}
DEFAULT_SEED = np.asarray(kvjax.tenant_seed(CFG))
SEEDS = {name: (DEFAULT_SEED if s is None else np.asarray(s)) for name, s in TENANTS.items()}
COUNTS = {"sequences": 0, "attached_pages": 0, "refused": 0, "poisoned": 0, "checks": 0}


def kv_of(tenant: str, prefix: tuple) -> tuple[np.ndarray, np.ndarray]:
  """The K and V [D] the model gives the last token of ``prefix`` in ``tenant``'s sequence."""
  if prefix[-1] == POISON:
    return np.full(2, np.nan, np.float32), np.full(2, np.nan, np.float32)
  u = zlib.crc32(repr((tenant, prefix)).encode()) % 1000 / 100.0
  return (np.array([u / 4, -u / 8], np.float32), np.array([u, 1 - u], np.float32))


def _kv_rows(tenant, hist, start, t):
  """[1, t, 1, 2] K and V of hist[start:start + t] (zero padding)."""
  k = np.zeros((1, t, 1, 2), np.float32)
  v = np.zeros((1, t, 1, 2), np.float32)
  for i in range(start, len(hist)):
    k[0, i - start, 0], v[0, i - start, 0] = kv_of(tenant, tuple(hist[:i + 1]))
  return k, v


def _layer(p):
  return jax.tree.map(lambda a: a[0], p)


def _put(pages, layer):
  return jax.tree.map(lambda a, b: a.at[0].set(b), pages, layer)


@jax.jit
def _step(state, seq_id, tokens, num_new, seeds, k, v):
  """What a user's step does: plan, write K and V, flag non-finite writes."""
  plan, state = kvjax.plan_step(state, seq_id, tokens, num_new, seeds, config=CFG)
  state = state.replace(k=_put(state.k, kvjax.write(_layer(state.k), plan, k)),
                        v=_put(state.v, kvjax.write(_layer(state.v), plan, v)))
  return plan, kvjax.flag_sequences(state, plan.seq_ids, kvjax.write_flags(plan, k, v))


_attach = jax.jit(functools.partial(kvjax.attach_prefix, config=CFG))
_release = jax.jit(functools.partial(kvjax.release, config=CFG))
_fork = jax.jit(functools.partial(kvjax.fork, config=CFG))
_relieve = jax.jit(functools.partial(pressure.relieve, config=CFG,
                                     pressure=pressure.PressureConfig(batch=1)))
# Host arrays go into the jitted ops as they are and results are read with np.asarray
# (cached on the array), not through eager jnp calls and device indexing in every rule.
_clear_status = jax.jit(kvjax.clear_status)
_ZERO_STATUS = jnp.int32(0)


@jax.jit
def _read(state, query):
  """Every slot's attention output for ``query`` [B, 1, 1, 2] over its cached tokens."""
  lens = state.seq_lens
  plan = StepPlan(seq_ids=jnp.arange(B, dtype=jnp.int32), positions=lens[:, None],
                  valid=jnp.zeros((B, 1), bool), slots=jnp.full((B, 1), P * S, jnp.int32),
                  page_table=state.page_table, kv_lens=lens, cow_src=jnp.full((B,), P),
                  cow_dst=jnp.full((B,), P), refused=jnp.zeros((B,), bool),
                  seq_status=jnp.zeros((B,), jnp.int32))
  return kvjax.attend(query, _layer(state.k), _layer(state.v), plan).out


def _reference(k, v, q):
  """numpy attention of one query [D] over keys/values [N, D] (float64)."""
  k, v, q = (np.asarray(a, np.float64) for a in (k, v, q))
  logits = k @ q / np.sqrt(2.0)
  w = np.exp(logits - np.max(logits))
  return (w / w.sum()) @ v


# Prompts share a few prefixes (so tenants send identical prompts and prefixes get reused)
# and end in a random tail; POISON is rare.
_PREFIXES = [[], [1, 2], [1, 2, 3, 1], [2, 3, 1, 2, 3, 1], [1, 2, POISON, 1]]
tokens_st = st.builds(lambda pre, tail: (pre + tail)[:W] or [1], st.sampled_from(_PREFIXES),
                      st.lists(st.sampled_from([1, 2, 3, 1, 2, 3, POISON]), min_size=1,
                               max_size=3))


class TenantMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.state = kvjax.init(CFG)
    self.seqs = {}          # slot -> {"tenant", "hist", "poison"}
    self.computed = set()   # (tenant, prefix of whole pages) written by some sequence

  # ---------------------------------------------------------------- helpers

  def _plan(self, slot, tenant, new, seeds):
    """Plan and write ``new`` tokens for ``slot`` (the model's tenant ``tenant``)."""
    seq = self.seqs.get(slot, {"tenant": tenant, "hist": [], "poison": False})
    t = W if len(new) > 1 else 1
    tokens = np.zeros((1, t), np.int32)
    tokens[0, :len(new)] = new
    hist = seq["hist"] + list(new)
    k, v = _kv_rows(seq["tenant"], hist, len(seq["hist"]), t)
    before = int(np.asarray(self.state.seq_lens)[slot])
    seed_arg = np.zeros((1, 2), np.uint32) if seeds is None else np.asarray(seeds)[None]
    plan, self.state = _step(self.state, np.array([slot], np.int32), tokens,
                             np.array([len(new)], np.int32), seed_arg, k, v)
    if bool(np.asarray(plan.refused)[0]):
      COUNTS["refused"] += 1
      assert int(np.asarray(self.state.seq_lens)[slot]) == before, \
          "a refused row changed its sequence"
      return False
    seq["hist"] = hist
    seq["poison"] = seq["poison"] or POISON in new
    COUNTS["poisoned"] += POISON in new
    self.seqs[slot] = seq
    for j in range(len(hist) // S):
      self.computed.add((seq["tenant"], tuple(hist[:(j + 1) * S])))
    return True

  # ---------------------------------------------------------------- rules

  def _free_slot(self, slot):
    """``slot`` if empty, else the first empty slot, else ``slot`` after releasing it."""
    if slot not in self.seqs:
      return slot
    empty = [s for s in range(B) if s not in self.seqs]
    if empty:
      return empty[0]
    self.release(slot)
    return slot

  def _attach_start(self, slot, tenant, prompt):
    """``attach_prefix`` of ``prompt`` into empty ``slot`` under ``tenant``'s seed; checks
    what it attached and records it. Returns the cached token count."""
    COUNTS["sequences"] += 1
    padded = np.zeros((1, W), np.int32)
    padded[0, :len(prompt)] = prompt
    cached, self.state = _attach(self.state, np.array([slot], np.int32), padded,
                                 np.array([len(prompt)], np.int32), TENANTS[tenant])
    c = int(cached[0])
    assert c % S == 0 and c < len(prompt)
    for j in range(c // S):    # only what a sequence of the same tenant computed
      assert (tenant, tuple(prompt[:(j + 1) * S])) in self.computed, "cross-tenant page"
    COUNTS["attached_pages"] += c // S
    if c:
      self.seqs[slot] = {"tenant": tenant, "hist": list(prompt[:c]), "poison": False}
    return c

  @rule(slot=st.integers(0, B - 1), tenant=st.sampled_from(sorted(TENANTS)), prompt=tokens_st)
  def start(self, slot, tenant, prompt):
    """A new request: reuse the longest cached prefix of its tenant, compute the rest."""
    slot = self._free_slot(slot)
    c = self._attach_start(slot, tenant, prompt)
    self._plan(slot, tenant, prompt[c:], TENANTS[tenant])

  @rule(slot=st.integers(0, B - 1), prompt=tokens_st)
  def reuse_slot_without_release(self, slot, prompt):
    """The attack of the issue: tenant a's attach on a slot, then a prompt planned there
    with no seed. A slot that matched nothing must start in the default namespace."""
    slot = self._free_slot(slot)
    c = self._attach_start(slot, "a", prompt)
    self._plan(slot, "a" if c else "default", prompt[c:], None)

  @rule(slot=st.integers(0, B - 1), token=st.sampled_from([1, 2, 3, POISON]),
        with_seed=st.booleans())
  def decode(self, slot, token, with_seed):
    seq = self.seqs.get(slot)
    if seq is None:
      return
    self._plan(slot, seq["tenant"], [token], TENANTS[seq["tenant"]] if with_seed else None)

  @rule(slot=st.integers(0, B - 1))
  def decode_as_another_tenant(self, slot):
    seq = self.seqs.get(slot)
    if seq is None:
      return
    other = next(t for t in ("a", "b") if t != seq["tenant"])
    before = self.state
    plan, self.state = _step(self.state, np.array([slot], np.int32), np.array([[1]], np.int32),
                             np.array([1], np.int32), SEEDS[other][None],
                             np.zeros((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32))
    assert bool(np.asarray(plan.refused)[0])
    assert int(np.asarray(plan.seq_status)[0]) == kvjax.BAD_INPUT
    assert int(np.asarray(self.state.seq_lens)[slot]) == int(np.asarray(before.seq_lens)[slot])

  @rule(slot=st.integers(-1, B))
  def release(self, slot):
    self.seqs.pop(slot, None)
    self.state = _release(self.state, np.array([slot], np.int32))
    if not 0 <= slot < B and slot != -1:
      assert int(self.state.status) & kvjax.BAD_INPUT
    self.state = _clear_status(self.state).replace(seq_status=self.state.seq_status)

  @rule(src=st.integers(0, B - 1), dst=st.integers(0, B - 1))
  def fork(self, src, dst):
    ok = src != dst and src in self.seqs and dst not in self.seqs and int(
        np.asarray(self.state.seq_lens)[src]) > 0
    self.state = _fork(self.state, np.array([src], np.int32), np.array([dst], np.int32))
    if ok:
      COUNTS["sequences"] += 1
      self.seqs[dst] = {k: (list(v) if isinstance(v, list) else v)
                        for k, v in self.seqs[src].items()}
    else:
      assert int(self.state.status) & kvjax.BAD_INPUT
    self.state = self.state.replace(status=_ZERO_STATUS)

  @rule()
  def relieve(self):
    _, self.state = _relieve(self.state)

  # ---------------------------------------------------------------- invariants

  @invariant()
  def bookkeeping(self):
    kvjax.check_invariants(self.state, CFG)

  @invariant()
  def matches_model(self):
    COUNTS["checks"] += 1
    table = np.asarray(self.state.page_table)
    lens = np.asarray(self.state.seq_lens)
    kd = np.asarray(self.state.k.data)[0, :, :, 0]
    vd = np.asarray(self.state.v.data)[0, :, :, 0]
    ns = np.asarray(self.state.meta.namespace)
    flags = np.asarray(self.state.seq_status)
    expect_ref = np.zeros(P, np.int64)
    query = np.ones((B, 1, 1, 2), np.float32)
    query[:, 0, 0, 1] = np.arange(B) - 1.5
    out = np.asarray(_read(self.state, query))
    for slot in range(B):
      seq = self.seqs.get(slot)
      if seq is None:
        assert lens[slot] == 0 and (table[slot] == -1).all()
        continue
      hist, tenant = seq["hist"], seq["tenant"]
      assert lens[slot] == len(hist)
      pages = table[slot][:-(-len(hist) // S)]
      assert (pages >= 0).all() and (table[slot][len(pages):] == -1).all()
      expect_ref[pages] += 1
      assert (ns[pages] == SEEDS[tenant]).all(), f"slot {slot}: page of another namespace"
      k, v = _kv_rows(tenant, hist, 0, len(hist))
      got_k = kd[pages].reshape(-1, 2)[:len(hist)]
      got_v = vd[pages].reshape(-1, 2)[:len(hist)]
      np.testing.assert_array_equal(got_k, k[0, :, 0])
      np.testing.assert_array_equal(got_v, v[0, :, 0])
      want = _reference(k[0, :, 0], v[0, :, 0], query[slot, 0, 0])
      if POISON in hist:
        assert not np.isfinite(out[slot]).all()
      else:
        assert np.isfinite(out[slot]).all(), f"slot {slot}: poisoned by another sequence"
        np.testing.assert_allclose(out[slot, 0, 0], want, rtol=1e-5, atol=1e-5)
      assert bool(flags[slot] & kvjax.NON_FINITE) == seq["poison"]
    np.testing.assert_array_equal(np.asarray(self.state.meta.ref_count), expect_ref)


@pytest.mark.slow
def test_tenants_never_share_and_never_poison_each_other():
  COUNTS.update(sequences=0, attached_pages=0, refused=0, poisoned=0, checks=0)
  run_state_machine_as_test(TenantMachine, settings=settings(
      max_examples=100, stateful_step_count=50, deadline=None, database=None))
  # the run exercised what it claims to. Hypothesis draws differ per run: over 30 runs the
  # counts were sequences 1,042-2,031, attached pages 107-877, refused 405-915, poisoned
  # 180-475, so these floors sit near a third of the lowest (the old floors, sequences 1,000
  # and attached pages 100, were within a few per cent of the lowest; a full-suite run failed)
  assert COUNTS["sequences"] >= 400 and COUNTS["attached_pages"] >= 30, COUNTS
  assert COUNTS["refused"] >= 100 and COUNTS["poisoned"] >= 60, COUNTS
