"""Per-block features at decision time, from a block's access history and its position.

A block's history is kept in a hashed **history table** (``TABLE_SIZE`` rows, one per
key bucket, tagged with a second hash of the key): previous accesses, the clock of the
last one and the last ``GAPS`` inter-access gaps. It is updated on every reference,
cached or not, so the features of a reference do not depend on what the cache holds:
the same values are computed offline for training (``extract``, plain Python over a
trace) and online by the ``learned`` policy (``kvjax.policies.learned``, the same
``row_step`` rule and ``block_features`` formula in jnp), and a test checks they agree
reference by reference.

Every feature is normalized to transfer across traces: counts, gaps, positions and
prefix depths as ``log1p`` scales, shares and flags in [0, 1]; no block id, key or
absolute time. Names in shapes: N = references, K = ``GAPS``, F = ``NUM_FEATURES``.

>>> f = extract(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), np.full(4, 512), 512)
>>> f.shape, float(f[2, 0]) > 0.0     # the second reference to block 0 has a count
((4, 23), True)
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from kvjax.prefix.hashing import fmix32

GAPS = 6               # inter-access gaps kept per block (K)
TABLE_SIZE = 65537     # history table rows (odd, so it never equals a pool's page count)
STATIC = 11            # static features per reference
NUM_FEATURES = STATIC + 2 * GAPS   # static, then K log gaps (newest first), then K masks
GAP_SCALE = 12.0       # log1p(gap) / GAP_SCALE ~ [0, 1.5] for gaps up to 2^17
COUNT_SCALE = 4.0
POS_SCALE = 6.0
NAMES = ("log_count", "known", "log_gap", "log_position", "partial", "log_parent_count",
         "log_known_prefix", "log_new_depth", "fill_share", "log_prefix_count",
         "log_prefix_gap") + tuple(
             f"log_gap{j}" for j in range(GAPS)) + tuple(f"has_gap{j}" for j in range(GAPS))


def key_bucket(key: jax.Array, size: int = TABLE_SIZE) -> tuple[jax.Array, jax.Array]:
  """(int32 [...] row, uint32 [...] nonzero tag) of uint32 [..., 2] block keys.

  >>> r, t = key_bucket(jnp.array([[1, 0], [2, 0]], jnp.uint32))
  >>> bool((r < TABLE_SIZE).all()), bool((t != 0).all())
  (True, True)
  """
  key = jnp.asarray(key, jnp.uint32)
  h = fmix32(key[..., 0] ^ fmix32(key[..., 1] + jnp.uint32(0x85EBCA6B)))
  row = (h % jnp.uint32(size)).astype(jnp.int32)
  tag = fmix32(h + jnp.uint32(0x27D4EB2F)) | jnp.uint32(1)
  return row, tag


def block_features(count, gap_now, gaps, position, filled, page_size, parent_count,
                   known_prefix, prefix_count, prefix_gap) -> jax.Array:
  """float32 [..., F] features of references (any batch shape ``...``).

  Args:
    count: int [...] previous accesses of the block (0 = first seen).
    gap_now: int [...] references since its last access (0 when first seen).
    gaps: int [..., K] its earlier inter-access gaps, newest first (0 = none).
    position: int [...] block index in its sequence.
    filled: int [...] tokens in the block; ``page_size`` (static int) tokens per block.
    parent_count: int [...] accesses of the previous block of the sequence (0 at its start).
    known_prefix: int [...] leading blocks of the sequence, up to this one, seen before.
    prefix_count, prefix_gap: int [...] ``count`` and ``gap_now`` of the deepest of those
      (0 when there is none): what a new block learns from the sequence it extends.

  >>> block_features(0, 0, jnp.zeros(GAPS), 0, 512, 512, 0, 0, 0, 0).shape
  (23,)
  """
  f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  count, gap_now, gaps, position = f(count), f(gap_now), f(gaps), f(position)
  filled, parent_count, known_prefix = f(filled), f(parent_count), f(known_prefix)
  prefix_count, prefix_gap = f(prefix_count), f(prefix_gap)
  static = [
      jnp.log1p(count) / COUNT_SCALE,
      (count > 0).astype(jnp.float32),
      jnp.log1p(gap_now) / GAP_SCALE,
      jnp.log1p(position) / POS_SCALE,
      (filled < page_size).astype(jnp.float32),
      jnp.log1p(parent_count) / COUNT_SCALE,
      jnp.log1p(known_prefix) / POS_SCALE,
      jnp.log1p(jnp.maximum(position + 1 - known_prefix, 0)) / POS_SCALE,
      filled / page_size,
      jnp.log1p(prefix_count) / COUNT_SCALE,
      jnp.log1p(prefix_gap) / GAP_SCALE,
  ]
  return jnp.concatenate([jnp.stack(static, axis=-1), jnp.log1p(gaps) / GAP_SCALE,
                          (gaps > 0).astype(jnp.float32)], axis=-1)


def gap_sequence(features: jax.Array) -> jax.Array:
  """float32 [..., K, STATIC + 2]: the gap history oldest first, one token per gap
  (log gap, present flag) with the static features appended to every token (what the
  LSTM and the Transformer read).

  >>> gap_sequence(jnp.zeros((3, NUM_FEATURES))).shape
  (3, 6, 13)
  """
  static = features[..., :STATIC]
  g = features[..., STATIC:STATIC + GAPS][..., ::-1]
  m = features[..., STATIC + GAPS:][..., ::-1]
  tok = jnp.stack([g, m], axis=-1)
  rep = jnp.broadcast_to(static[..., None, :], tok.shape[:-1] + (STATIC,))
  return jnp.concatenate([tok, rep], axis=-1)


def extract(block: np.ndarray, position: np.ndarray, filled: np.ndarray, page_size: int,
            *, table_size: int = TABLE_SIZE, keys: np.ndarray | None = None) -> np.ndarray:
  """float32 [N, F] features of every reference of a trace, computed offline.

  The history table is replayed in plain Python with the rule of ``row_step`` (a
  reference reads its row, then writes it), so the result equals what the online policy
  computes at each reference.

  Args:
    block: int [N] block ids (the simulator's key of block ``b`` is ``(b + 1, 0)``).
    position, filled: int [N] block index in its sequence, tokens in the block.
    page_size: tokens per block.
    table_size: history table rows.
    keys: uint32 [N, 2] block keys instead of ``(block + 1, 0)``.
  """
  block = np.asarray(block)
  n = block.shape[0]
  if keys is None:
    keys = np.stack([(block + 1).astype(np.uint32), np.zeros(n, np.uint32)], axis=-1)
  rows, tags = (np.asarray(a) for a in key_bucket(jnp.asarray(keys), table_size))
  rows, tags, pos_l = rows.tolist(), tags.tolist(), np.asarray(position).tolist()
  t_tag = [0] * table_size
  t_last = [0] * table_size
  t_count = [0] * table_size
  t_gaps = [(0,) * GAPS] * table_size
  count = np.zeros(n, np.int64)
  gap_now = np.zeros(n, np.int64)
  gaps = np.zeros((n, GAPS), np.int64)
  parent = np.zeros(n, np.int64)
  prefix = np.zeros(n, np.int64)
  pcount = np.zeros(n, np.int64)
  pgap = np.zeros(n, np.int64)
  prev_pos, prev_count, prev_run, prev_pc, prev_pg = -2, 0, 0, 0, 0
  for i in range(n):
    r, tg, p = rows[i], tags[i], pos_l[i]
    known = t_tag[r] == tg
    c = t_count[r] if known else 0
    g = i - t_last[r] if known else 0
    gs = t_gaps[r] if known else (0,) * GAPS
    contiguous = p == prev_pos + 1
    pc = prev_count if contiguous else 0
    inherit = contiguous and p > 0
    run, rc, rg = (prev_run, prev_pc, prev_pg) if inherit else (0, 0, 0)
    if run == p and known:
      run, rc, rg = p + 1, c, g
    count[i], gap_now[i], gaps[i], parent[i], prefix[i] = c, g, gs, pc, run
    pcount[i], pgap[i] = rc, rg
    t_tag[r], t_last[r], t_count[r] = tg, i, c + 1
    t_gaps[r] = ((g,) + gs[:-1]) if known else (0,) * GAPS
    prev_pos, prev_count, prev_run, prev_pc, prev_pg = p, c + 1, run, rc, rg
  feats = block_features(count, gap_now, gaps, position, filled, page_size, parent, prefix,
                         pcount, pgap)
  return np.asarray(feats, np.float32)
