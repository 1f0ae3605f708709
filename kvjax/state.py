"""Cache state: immutable pytrees of arrays, built by ``init``.

Every field carries its shape and dtype in a comment. Names used in shapes:
L = num_layers, P = num_pages, S = page_size, H = num_kv_heads, D = head_dim,
B = max_seqs, M = max_pages_per_seq.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.config import CacheConfig
from kvjax.hashing import namespace_seed
from kvjax.prefix_index import PrefixIndex
from kvjax.prefix_index import index_init
from kvjax import quant
from kvjax.quant import QuantSpec

# Status bit flags. Sticky in ``CacheState.status`` (OR of every step since the
# last ``clear_status``); per step in ``StepPlan.seq_status``.
OUT_OF_PAGES = 1       # a sequence needed pages and the pool had none evictable
SEQ_FULL = 2           # a sequence would pass max_pages_per_seq
BAD_INPUT = 4          # a row's seq id out of range or repeated, or num_new outside [0, T]
INDEX_OVERFLOW = 8     # prefix index probe budget exceeded (insert skipped)
NON_FINITE = 16        # a NaN or inf K/V was written into a sequence
OUT_OF_RANGE = 32      # a K/V value beyond what the quantization spec represents was clipped

STATUS_NAMES = {
    OUT_OF_PAGES: "OUT_OF_PAGES",
    SEQ_FULL: "SEQ_FULL",
    BAD_INPUT: "BAD_INPUT",
    INDEX_OVERFLOW: "INDEX_OVERFLOW",
    NON_FINITE: "NON_FINITE",
    OUT_OF_RANGE: "OUT_OF_RANGE",
}


def status_names(status: int) -> list[str]:
  """Names of the flags set in ``status``.

  >>> status_names(OUT_OF_PAGES | SEQ_FULL)
  ['OUT_OF_PAGES', 'SEQ_FULL']
  """
  return [name for bit, name in STATUS_NAMES.items() if int(status) & bit]


@struct.dataclass
class Pages:
  """One of K or V for all layers of one tier, with how it is stored.

  ``spec`` and ``residual`` are static (part of the tree structure, not
  arrays): ``write`` and ``attend`` read the layout from the pages they are
  given. A cache whose specs need staging (a channel-axis spec or a residual
  window, ``quant.needs_staging``) also holds each sequence's newest pages in
  full precision in ``stage``, a ring of ``NS = quant.staging_pages(...)``
  pages per sequence slot; page ``j`` of a sequence lives in ring slot
  ``j % NS`` until it is folded (quantized) into its pool page. A spec with a
  ``sink`` also keeps each sequence's first N tokens in ``sink`` (attention
  reads them from there; the pool page holds them quantized too, for
  sharing). Shapes below are for all layers; the layer scan sees them
  without the leading L.
  """

  data: jax.Array                    # [L, P, S, H, D] config dtype; uint8 [L, P, S, H, D/n]
  #                                    packed codes (n per byte) or float8_e4m3fn when quantized
  scale: Optional[jax.Array] = None  # [L, P, S, H, D/g] ("token") or [L, P, S/g, H, D]
  #                                    ("channel"), bf16/f16 or uint8 log8; None when unquantized
  zero: Optional[jax.Array] = None   # int8, scale's shape; asymmetric specs only, else None
  stage: Optional[jax.Array] = None  # [L, B, NS, S, H, D] config dtype: full-precision ring of
  #                                    each sequence slot's unfolded pages; None without staging
  sink: Optional[jax.Array] = None   # [L, B, N, H, D] config dtype: each sequence slot's first
  #                                    N tokens in full precision (``quant.sink_tokens``); None if N=0
  spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())  # static: the layout
  residual: int = struct.field(pytree_node=False, default=0)  # static: the cache's window
  #                                    (tokens, max of the K and V specs'), same on K and V
  rope_base: float = struct.field(pytree_node=False, default=0.0)  # static: > 0 on keys stored
  #                                    before RoPE (``CacheConfig.key_rope``); attend rotates them


@struct.dataclass
class PageMeta:
  """Layer-independent metadata, one entry per page."""

  ref_count: jax.Array     # int32 [P]  live sequences holding the page (0 = evictable)
  last_access: jax.Array   # int32 [P]  logical clock of the last step that used it
  access_count: jax.Array  # int32 [P]  steps that used it
  block_hash: jax.Array    # uint32 [P, 2]  chained content hash, (0, 0) = none
  parent: jax.Array        # int32 [P]  page of the previous block (-1 at a sequence start)
  tokens: jax.Array        # int32 [P, S]  token ids written into the page (-1 = empty slot)
  position: jax.Array      # int32 [P]  block index in its sequence
  filled: jax.Array        # int32 [P]  tokens written (0 = empty page)
  namespace: jax.Array     # uint32 [P, 2]  chain seed of the sequence that filled the page


@struct.dataclass
class Stats:
  """Counters only (monotone); rates are derived by the reader."""

  steps: jax.Array             # int32 []  plan_step calls
  tokens_planned: jax.Array    # int32 []  new tokens given slots
  pages_allocated: jax.Array   # int32 []  pages taken from the pool
  evictions: jax.Array         # int32 []  cached (hashed, unreferenced) pages reused
  cow_copies: jax.Array        # int32 []  shared partial pages copied on write
  refused: jax.Array           # int32 []  (sequence, step) pairs refused
  prefix_query_tokens: jax.Array  # int32 []  prompt tokens looked up in the prefix index
  prefix_hit_tokens: jax.Array    # int32 []  of those, served from cached pages
  prefix_query_pages: jax.Array   # int32 []  full prompt pages looked up
  prefix_hit_pages: jax.Array     # int32 []  of those, found and verified


@struct.dataclass
class DropState:
  """Per-sequence state of attention-aware page dropping (``kvjax.drop``), opt-in.

  Present (``CacheState.drop``) only when ``kvjax.drop.enable`` attached it. In
  this mode ``CacheState.seq_lens`` counts the tokens *in the page table*
  (what ``plan_step``, ``write`` and ``attend`` index), and a token's logical
  (RoPE) position is ``seq_lens + dropped`` at the time it is written.
  """

  mass: jax.Array      # float32 [B, M]  attention probability mass each page-table column
  #                      received since its page was placed there (summed over layers,
  #                      query heads and queries)
  seen: jax.Array      # float32 [B, M]  mass all of the sequence's queries spread (over every
  #                      column) while this column held its page: ``mass / seen`` is its share
  owner: jax.Array     # int32 [B, M]  page whose mass ``mass`` holds (-1 = none); a column
  #                      whose page changed restarts from 0
  dropped: jax.Array   # int32 [B]  tokens dropped from each sequence (logical - cached)
  pages_dropped: jax.Array  # int32 []  counter: pages dropped by ``drop_pages`` (monotone)


@struct.dataclass
class CacheState:
  """The whole cache. Thread it through jitted steps; donate it."""

  k: Pages
  v: Pages
  meta: PageMeta
  index: PrefixIndex     # block hash -> page, for full pages (capacity C = config.index_slots)
  page_table: jax.Array  # int32 [B, M]  page of each block of each sequence (-1 = none)
  seq_lens: jax.Array    # int32 [B]  tokens cached per sequence
  seq_seed: jax.Array    # uint32 [B, 2]  hash-chain seed of each sequence ((0, 0) = config default)
  clock: jax.Array       # int32 []  logical time, +1 per plan_step
  stats: Stats
  status: jax.Array      # int32 []  sticky OR of status flags
  seq_status: jax.Array  # int32 [B]  sticky OR of the flags of each sequence slot (refusals,
  #   non-finite or clipped K/V); reset when the slot is released or started anew
  fold_floor: Optional[jax.Array] = None  # int32 [B]  leading pages of each sequence that are
  #   folded whatever the staging rule says (attached from the prefix cache); None without staging
  policy: Any = ()  # the eviction policy's history arrays, [P]-leading (``Policy.init(P)``,
  #   e.g. LFU's float32 [P] counts); () for the stateless ``lru``/``weighted``
  drop: Optional[DropState] = None  # page dropping state (``kvjax.drop.enable``); None = off


def _zeros_stats() -> Stats:
  z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
  return Stats(**{f.name: z() for f in Stats.__dataclass_fields__.values()})


def init_meta(num_pages: int, page_size: int) -> PageMeta:
  """Metadata of ``num_pages`` empty pages."""
  return PageMeta(
      ref_count=jnp.zeros((num_pages,), jnp.int32),
      last_access=jnp.zeros((num_pages,), jnp.int32),
      access_count=jnp.zeros((num_pages,), jnp.int32),
      block_hash=jnp.zeros((num_pages, 2), jnp.uint32),
      parent=jnp.full((num_pages,), -1, jnp.int32),
      tokens=jnp.full((num_pages, page_size), -1, jnp.int32),
      position=jnp.zeros((num_pages,), jnp.int32),
      filled=jnp.zeros((num_pages,), jnp.int32),
      namespace=jnp.zeros((num_pages, 2), jnp.uint32),
  )


def init_pages(config: CacheConfig, spec: Optional[QuantSpec] = None, *,
               rope_base: float = 0.0) -> Pages:
  """Empty (zero) pages of one of K/V for all layers, stored in ``spec``.

  Args:
    config: the cache config (shapes, dtype, and both specs: the staging ring
      exists when ``quant.needs_staging(config.key_quant, config.value_quant)``).
    spec: ``config.key_quant`` or ``config.value_quant``; default unquantized.
    rope_base: ``config.key_rope`` for the keys (stored before RoPE), else 0.

  Returns:
    ``Pages`` with arrays ``[L, P, S, H, *]`` (see ``Pages``) and, with staging,
    a zero ring ``[L, B, NS, S, H, D]``.

  >>> cfg = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=8, page_size=4, num_pages=3,
  ...                   max_seqs=2, max_pages_per_seq=2, key_quant=QuantSpec(bits=4))
  >>> init_pages(cfg, cfg.key_quant).data.shape
  (2, 3, 4, 1, 4)
  """
  spec = QuantSpec() if spec is None else spec
  shape = (config.num_layers, config.num_pages, config.page_size, config.num_kv_heads,
           config.head_dim)
  ks, vs = config.key_quant, config.value_quant
  if not spec.is_quantized and not quant.needs_staging(ks, vs) and not quant.sink_tokens(ks, vs):
    return Pages(data=jnp.zeros(shape, config.jnp_dtype), spec=spec, rope_base=rope_base)
  pages = quant.init_quant_pages(spec, num_pages=config.num_pages, page_size=config.page_size,
                                 num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                 dtype=config.dtype, num_layers=config.num_layers)
  ns = quant.staging_pages(ks, vs, config.page_size)
  stage = sink = None
  if ns:
    stage = jnp.zeros((config.num_layers, config.max_seqs, ns, config.page_size,
                       config.num_kv_heads, config.head_dim), config.jnp_dtype)
  if quant.sink_tokens(ks, vs):
    sink = jnp.zeros((config.num_layers, config.max_seqs, quant.sink_tokens(ks, vs),
                      config.num_kv_heads, config.head_dim), config.jnp_dtype)
  return Pages(data=pages.data, scale=pages.scale, zero=pages.zero, stage=stage, sink=sink,
               spec=spec, residual=quant.residual_tokens(ks, vs), rope_base=rope_base)


def row_seeds(seeds, b: int, name: str = "seeds") -> jax.Array:
  """uint32 [B, 2]: one namespace seed per row from ``seeds`` (None, [2] or [B, 2]).

  ``None`` gives (0, 0) rows (the config's default). Raises ``ValueError`` naming
  ``name`` for another shape or a non-integer dtype.

  >>> row_seeds(jnp.array([1, 2], jnp.uint32), 2).tolist()
  [[1, 2], [1, 2]]
  """
  if seeds is None:
    return jnp.zeros((b, 2), jnp.uint32)
  seeds = jnp.asarray(seeds)
  if seeds.shape not in ((2,), (b, 2)) or not jnp.issubdtype(seeds.dtype, jnp.integer):
    raise ValueError(f"{name} must be uint32 [2] or [B, 2] = [{b}, 2] (kvjax.tenant_seed), got "
                     f"shape {tuple(seeds.shape)} dtype {seeds.dtype}")
  return jnp.broadcast_to(seeds.astype(jnp.uint32), (b, 2))


def default_seed(config: CacheConfig) -> jax.Array:
  """uint32 [2]: the hash-chain seed of ``config.namespace`` (no adapter, no tenant salt)."""
  return jnp.asarray(namespace_seed(config.namespace), jnp.uint32)


def init(config: CacheConfig) -> CacheState:
  """An empty cache for ``config``.

  Returns:
    A ``CacheState`` whose page arrays are ``[L, P, S, H, D]`` zeros.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> init(cfg).page_table.shape
  (2, 2)
  """
  if not isinstance(config, CacheConfig):
    raise ValueError(f"init: config must be a CacheConfig, got {type(config).__name__}")
  from kvjax import cache_policy  # noqa: PLC0415 (cache_policy -> policies -> state)
  staged = quant.needs_staging(config.key_quant, config.value_quant)
  return CacheState(
      k=init_pages(config, config.key_quant, rope_base=float(config.key_rope)),
      v=init_pages(config, config.value_quant),
      meta=init_meta(config.num_pages, config.page_size),
      index=index_init(config.index_slots),
      page_table=jnp.full((config.max_seqs, config.max_pages_per_seq), -1, jnp.int32),
      seq_lens=jnp.zeros((config.max_seqs,), jnp.int32),
      seq_seed=jnp.zeros((config.max_seqs, 2), jnp.uint32),
      clock=jnp.zeros((), jnp.int32),
      stats=_zeros_stats(),
      status=jnp.zeros((), jnp.int32),
      seq_status=jnp.zeros((config.max_seqs,), jnp.int32),
      fold_floor=jnp.zeros((config.max_seqs,), jnp.int32) if staged else None,
      policy=cache_policy.init_state(config),
  )


def clear_status(state: CacheState) -> CacheState:
  """The state with its sticky status flags cleared (the cache's and every sequence's).

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> st = init(cfg).replace(status=jnp.int32(BAD_INPUT))
  >>> int(clear_status(st).status)
  0
  """
  return state.replace(status=jnp.zeros((), jnp.int32),
                       seq_status=jnp.zeros_like(state.seq_status))


class CacheStatusError(RuntimeError):
  """A status flag was set in checked mode (or ``check_status`` found one).

  Raised on the host, after the call that set the flag has returned, so
  nothing is lost: ``state`` is the cache after that call, usable (its arrays
  are live even when the call donated its input), flags still set;
  ``kvjax.clear_status(err.state)`` continues.

  Attributes:
    status: int, the cache's sticky flags.
    rows: ``{seq_id: [flag names]}`` of the sequence slots with flags set.
    state: the ``CacheState`` after the call (``None`` when not available).
  """

  def __init__(self, message: str, *, status: int = 0, rows: Optional[dict] = None,
               state: Optional["CacheState"] = None):
    super().__init__(message)
    self.status = status
    self.rows = dict(rows or {})
    self.state = state


def flagged_rows(state: CacheState) -> dict:
  """``{seq_id: [flag names]}`` of the sequence slots whose ``seq_status`` is set (host-side).

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> flagged_rows(init(cfg).replace(seq_status=jnp.array([0, OUT_OF_PAGES])))
  {1: ['OUT_OF_PAGES']}
  """
  per_seq = jax.device_get(state.seq_status)
  return {int(i): status_names(s) for i, s in enumerate(per_seq.tolist()) if s}


def status_error(state: CacheState, what: str,
                 rows: Optional[dict] = None) -> Optional[CacheStatusError]:
  """The ``CacheStatusError`` for ``state`` (None when no flag is set), its message naming
  ``what`` and the rows (default ``flagged_rows(state)``); host-side."""
  status = int(jax.device_get(state.status))
  if not status:
    return None
  rows = flagged_rows(state) if rows is None else rows
  where = "; ".join(f"seq {i}: {', '.join(n)}" for i, n in rows.items())
  return CacheStatusError(f"{what}: {status_names(status)} (status={status})"
                          + (f"; {where}" if where else ""), status=status, rows=rows,
                          state=state)


def check_status(state: CacheState) -> CacheState:
  """Host-side check: raise ``CacheStatusError`` (with the rows and the state) if a flag is set.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> _ = check_status(init(cfg))
  """
  err = status_error(state, "cache status flags set")
  if err is not None:
    raise err
  return state


def is_traced(state: CacheState) -> bool:
  """Whether ``state`` is being traced (inside ``jit``), so that its values are not known."""
  return isinstance(state.status, jax.core.Tracer)


def enforce_checked(state: CacheState, config: Optional[CacheConfig]) -> CacheState:
  """Checked mode at a host boundary: raise ``CacheStatusError`` if ``config.checked`` and a
  flag is set.

  Eager calls of the cache's ops, the model's ``decode_step`` and host loops,
  and functions wrapped by ``checked`` raise here, after the new state exists,
  so a refusal never deletes the cache. Inside ``jit`` (a traced state)
  nothing can be raised without losing the outputs, so this returns the state
  unchanged and the flags wait for the host (wrap the jitted function with
  ``kvjax.checked``).
  """
  if config is None or not config.checked or is_traced(state):
    return state
  return check_status(state)


def checked(fn):
  """Wrap ``fn`` (e.g. a jitted step) so that it raises ``CacheStatusError`` when a
  ``CacheState`` it returns has a status flag set.

  The error carries that returned state (``err.state``), so a donated step
  that was refused loses nothing.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=1, max_seqs=1, max_pages_per_seq=1)
  >>> import kvjax
  >>> step = checked(jax.jit(kvjax.plan_step, static_argnames="config", donate_argnums=0))
  >>> try:
  ...   step(init(cfg), jnp.array([0]), jnp.array([[1, 2, 3]]), jnp.array([3]), config=cfg)
  ... except CacheStatusError as err:
  ...   print(err.rows, int(err.state.seq_lens[0]))
  {0: ['SEQ_FULL']} 0
  """
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    out = fn(*args, **kwargs)
    for leaf in (out if isinstance(out, tuple) else (out,)):
      if isinstance(leaf, CacheState):
        err = status_error(leaf, f"{getattr(fn, '__name__', 'step')}: cache status flags set")
        if err is not None:
          raise err
    return out

  return wrapper
