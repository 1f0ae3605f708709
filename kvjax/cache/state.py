"""Cache state: immutable pytrees of arrays, built by ``init``.

Every field carries its shape and dtype in a comment. Names used in shapes:
L = num_layers, P = num_pages, S = page_size, H = num_kv_heads, D = head_dim,
B = max_seqs, M = max_pages_per_seq.
"""

from __future__ import annotations

from typing import Any, Optional

from flax import struct
import jax
import jax.numpy as jnp

from kvjax.cache.config import CacheConfig
from kvjax.layout.meta import init_meta
from kvjax.layout.meta import PageMeta
from kvjax.layout.pages import layer_of
from kvjax.layout.pages import Pages
from kvjax.layout.pages import with_layer
from kvjax.layout.shapes import needs_staging
from kvjax.layout.shapes import residual_tokens
from kvjax.layout.shapes import sink_tokens
from kvjax.layout.shapes import staging_pages
from kvjax.layout.spec import QuantSpec
from kvjax.policies.adapter import init_state
from kvjax.policies.adapter import initial_params
from kvjax.policies.adapter import policy_of
from kvjax.policies.contract import make_params
from kvjax.prefix.hashing import namespace_seed
from kvjax.prefix.index import index_init
from kvjax.prefix.index import PrefixIndex
from kvjax.quant.pages import init_quant_pages



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
  policy_params: dict = struct.field(default_factory=dict)  # {name: float32 []}  the eviction
  #   policy's parameters (``make_params(config.eviction, **config.eviction_params)`` at
  #   ``init``; {} for ``lru``): arrays, so ``set_policy_params`` does not recompile a step
  drop: Optional[DropState] = None  # page dropping state (``kvjax.drop.enable``); None = off


def _zeros_stats() -> Stats:
  z = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
  return Stats(**{f.name: z() for f in Stats.__dataclass_fields__.values()})


def init_pages(config: CacheConfig, spec: Optional[QuantSpec] = None, *,
               rope_base: float = 0.0) -> Pages:
  """Empty (zero) pages of one of K/V for all layers, stored in ``spec``.

  Args:
    config: the cache config (shapes, dtype, and both specs: the staging ring
      exists when ``needs_staging(config.key_quant, config.value_quant)``).
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
  if not spec.is_quantized and not needs_staging(ks, vs) and not sink_tokens(ks, vs):
    return Pages(data=jnp.zeros(shape, config.jnp_dtype), spec=spec, rope_base=rope_base)
  pages = init_quant_pages(spec, num_pages=config.num_pages, page_size=config.page_size,
                                 num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                                 dtype=config.dtype, num_layers=config.num_layers)
  ns = staging_pages(ks, vs, config.page_size)
  stage = sink = None
  if ns:
    stage = jnp.zeros((config.num_layers, config.max_seqs, ns, config.page_size,
                       config.num_kv_heads, config.head_dim), config.jnp_dtype)
  if sink_tokens(ks, vs):
    sink = jnp.zeros((config.num_layers, config.max_seqs, sink_tokens(ks, vs),
                      config.num_kv_heads, config.head_dim), config.jnp_dtype)
  return Pages(data=pages.data, scale=pages.scale, zero=pages.zero, stage=stage, sink=sink,
               spec=spec, residual=residual_tokens(ks, vs), rope_base=rope_base)


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
  staged = needs_staging(config.key_quant, config.value_quant)
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
      policy=init_state(config),
      policy_params=initial_params(config),
  )


def clear_status(state: CacheState) -> CacheState:
  """The state with its sticky status flags cleared (the cache's and every sequence's).

  >>> from kvjax.cache.status import BAD_INPUT
  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2)
  >>> st = init(cfg).replace(status=jnp.int32(BAD_INPUT))
  >>> int(clear_status(st).status)
  0
  """
  return state.replace(status=jnp.zeros((), jnp.int32),
                       seq_status=jnp.zeros_like(state.seq_status))


def layer_pages(state: CacheState, i) -> tuple[Pages, Pages]:
  """Layer ``i``'s ``(k_pages, v_pages)``: what ``write`` / ``attend`` take.

  Args:
    state: the cache.
    i: int or int32 scalar (may be traced), ``0 <= i < num_layers``.

  Returns:
    Two one-layer ``Pages`` (data ``[P, S, H, *]``, ring ``[B, NS, S, H, D]``).

  >>> cfg = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=3, max_seqs=2, max_pages_per_seq=2)
  >>> k, v = layer_pages(init(cfg), 1)
  >>> k.data.shape
  (3, 2, 1, 4)
  """
  return layer_of(state.k, i), layer_of(state.v, i)


def with_layer_pages(state: CacheState, i, k_pages: Pages, v_pages: Pages) -> CacheState:
  """The state with layer ``i``'s pages replaced (by what ``write`` returned).

  The step fields ``write`` attaches for ``attend`` are dropped
  (``kvjax.layout.as_stored``); a layer of another layout or shape raises
  ``ValueError``.

  >>> cfg = CacheConfig(num_layers=2, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=3, max_seqs=2, max_pages_per_seq=2)
  >>> st = init(cfg)
  >>> k, v = layer_pages(st, 1)
  >>> st = with_layer_pages(st, 1, k.replace(data=k.data + 1), v)
  >>> st.k.data[:, 0, 0, 0, 0].tolist()
  [0.0, 1.0]
  """
  return state.replace(k=with_layer(state.k, i, k_pages), v=with_layer(state.v, i, v_pages))


def set_policy_params(state: CacheState, config: CacheConfig, **params) -> CacheState:
  """The state with the eviction policy's parameters ``params`` replaced (the others kept).

  The new values are float32 [] arrays like the ones they replace (same sharding where
  those were placed), so a jitted ``plan_step`` or ``decode_step`` runs them without
  retracing. ``config.eviction_params`` stays what ``init`` started from.

  Args:
    state: a state of ``config`` (``init(config)``).
    config: its config; ``config.eviction`` names the policy.
    **params: parameter name -> float value.

  Raises:
    ValueError: an unknown parameter or a value outside its bound (``make_params``'s
      message, naming it), or a state whose ``policy_params`` are not ``config``'s.

  >>> cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=2,
  ...                   num_pages=4, max_seqs=2, max_pages_per_seq=2, eviction="lfu")
  >>> st = set_policy_params(init(cfg), cfg, half_life=50)
  >>> float(st.policy_params["half_life"]), st.policy_params["half_life"].dtype
  (50.0, dtype('float32'))
  """
  checked = make_params(policy_of(config), **params)
  current = dict(state.policy_params)
  if set(current) != set(checked):
    raise ValueError(f"set_policy_params: the state's policy_params {sorted(current)} are not "
                     f"those of config.eviction={config.eviction!r} {sorted(checked)}")
  for name in params:
    old, new = current[name], checked[name]
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer) and old.committed:
      new = jax.device_put(new, old.sharding)
    current[name] = new
  return state.replace(policy_params=current)
