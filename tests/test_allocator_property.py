"""Stateful property test: plan/write/release/fork against a plain-Python allocator model.

The model gives every cached block a fresh logical id; fork copies the ids,
and appending to a shared partial block replaces its id (copy on write). The
real cache must map logical ids to pages one-to-one, with matching reference
counts, no leaked page, the model's refusals, and each sequence's history.
"""

import functools
import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine
from hypothesis.stateful import invariant
from hypothesis.stateful import rule

import kvjax

CFG = kvjax.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=1, page_size=2, num_pages=7,
                        max_seqs=4, max_pages_per_seq=3)
S, P, B, T = CFG.page_size, CFG.num_pages, CFG.max_seqs, 3


@jax.jit
def _step(state, seq_ids, tokens, num_new):
  plan, state = kvjax.plan_step(state, seq_ids, tokens, num_new, config=CFG)
  x = tokens.astype(jnp.float32)[:, :, None, None]
  k = kvjax.write(jax.tree.map(lambda a: a[0], state.k), plan, x)
  return plan, state.replace(k=jax.tree.map(lambda a, b: a.at[0].set(b), state.k, k))


_release = jax.jit(functools.partial(kvjax.release, config=CFG))
_fork = jax.jit(functools.partial(kvjax.fork, config=CFG))


class AllocatorMachine(RuleBasedStateMachine):

  def __init__(self):
    super().__init__()
    self.state = kvjax.init(CFG)
    self.blocks = {}   # seq -> list of logical block ids
    self.history = {}  # seq -> list of tokens
    self.fresh = itertools.count()
    self.next_token = itertools.count(1)

  def _holders(self, block):
    return sum(block in bl for bl in self.blocks.values())

  def _live_blocks(self):
    return {b for bl in self.blocks.values() for b in bl}

  @rule(rows=st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, T)), min_size=1,
                      max_size=B, unique_by=lambda r: r[0]))
  def plan(self, rows):
    seq_ids = np.full((B,), -1, np.int32)
    num_new = np.zeros((B,), np.int32)
    tokens = np.zeros((B, T), np.int32)
    for i, (sid, n) in enumerate(rows):
      seq_ids[i], num_new[i] = sid, n
      tokens[i, :n] = [next(self.next_token) for _ in range(n)]
    # Model: greedy admission in row order over the free pages.
    free = P - len(self._live_blocks())
    expect_refused, expect_status = [], []
    for i, (sid, n) in enumerate(rows):
      old = len(self.history.get(sid, []))
      new = old + n
      old_p, new_p = -(-old // S), -(-new // S)
      bl = self.blocks.get(sid, [])
      cow = n > 0 and old % S != 0 and self._holders(bl[-1]) > 1
      need = new_p - old_p + int(cow)
      if new_p > CFG.max_pages_per_seq:
        expect_refused.append(True), expect_status.append(kvjax.SEQ_FULL)
        continue
      if n > 0 and need > free:
        expect_refused.append(True), expect_status.append(kvjax.OUT_OF_PAGES)
        continue
      expect_refused.append(False), expect_status.append(0)
      if n == 0:
        continue
      free -= need
      bl = list(bl)
      if cow:
        bl[-1] = next(self.fresh)
      bl += [next(self.fresh) for _ in range(new_p - old_p)]
      self.blocks[sid] = bl
      self.history[sid] = self.history.get(sid, []) + list(tokens[i, :n])
    before = self.state
    plan, self.state = _step(self.state, jnp.asarray(seq_ids), jnp.asarray(tokens),
                             jnp.asarray(num_new))
    k = len(rows)
    np.testing.assert_array_equal(plan.refused[:k], expect_refused)
    np.testing.assert_array_equal(plan.seq_status[:k], expect_status)
    for i, (sid, _) in enumerate(rows):
      if expect_refused[i]:  # a refused row changes nothing of its sequence
        np.testing.assert_array_equal(self.state.page_table[sid], before.page_table[sid])
        assert int(self.state.seq_lens[sid]) == int(before.seq_lens[sid])

  @rule(sid=st.integers(0, B - 1))
  def release(self, sid):
    self.blocks.pop(sid, None)
    self.history.pop(sid, None)
    self.state = _release(self.state, jnp.array([sid, -1], jnp.int32))

  @rule(src=st.integers(0, B - 1), dst=st.integers(0, B - 1))
  def fork(self, src, dst):
    ok = src != dst and self.history.get(src) and not self.history.get(dst)
    before = int(self.state.status)
    self.state = _fork(self.state, jnp.array([src], jnp.int32), jnp.array([dst], jnp.int32))
    if ok:
      self.blocks[dst] = list(self.blocks[src])
      self.history[dst] = list(self.history[src])
    else:
      assert int(self.state.status) & kvjax.BAD_INPUT
    self.state = self.state.replace(status=jnp.array(before, jnp.int32))

  @rule(n_dst=st.integers(1, T), n_src=st.integers(0, T), dst_first=st.booleans())
  def fork_then_extend(self, n_dst, n_src, dst_first):
    """The copy-on-write path, made frequent: fork a live sequence, then extend both."""
    live = [s for s in range(B) if self.history.get(s)]
    empty = [s for s in range(B) if not self.history.get(s)]
    if not live or not empty:
      return
    src, dst = live[0], empty[0]
    self.fork(src, dst)
    rows = [(dst, n_dst), (src, n_src)]
    self.plan(rows if dst_first else rows[::-1])

  @invariant()
  def bookkeeping(self):
    kvjax.check_invariants(self.state, CFG)

  @invariant()
  def pages_match_model(self):
    table = np.asarray(self.state.page_table)
    ref = np.asarray(self.state.meta.ref_count)
    lens = np.asarray(self.state.seq_lens)
    block_to_page = {}
    expect_ref = np.zeros(P, np.int64)
    for sid in range(B):
      bl = self.blocks.get(sid, [])
      hist = self.history.get(sid, [])
      assert lens[sid] == len(hist)
      row = table[sid]
      assert (row[:len(bl)] >= 0).all() and (row[len(bl):] == -1).all()
      for blk, page in zip(bl, row):
        # Same logical block <=> same page: sharing only on purpose.
        assert block_to_page.setdefault(blk, page) == page
        expect_ref[page] += 1
      got = [int(self.state.meta.tokens[row[i // S], i % S]) for i in range(len(hist))]
      assert got == [int(x) for x in hist]
      kdat = np.asarray(self.state.k.data[0, :, :, 0, 0])
      assert [kdat[row[i // S], i % S] for i in range(len(hist))] == [float(x) for x in hist]
    assert len(set(block_to_page.values())) == len(block_to_page)
    np.testing.assert_array_equal(ref, expect_ref)  # reference counts, and no page leaks
    assert int(self.state.status) & kvjax.BAD_INPUT == 0


AllocatorMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=20,
                                              deadline=None)
TestAllocator = AllocatorMachine.TestCase
