"""Status flags, ``CacheStatusError`` and checked mode at the host boundaries.

Value-dependent failures inside ``jit`` set bits in ``CacheState.status``
(sticky, the cache's) and ``CacheState.seq_status`` (sticky, per sequence
slot). Nothing raises inside ``jit``: checked mode (``CacheConfig.checked``)
raises on the host, after the call that set the flag returned its state.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax

from kvjax.cache.config import CacheConfig
from kvjax.cache.state import CacheState
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

  >>> from kvjax.cache.state import init
  >>> import jax.numpy as jnp
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

  >>> from kvjax.cache.state import init
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

  >>> from kvjax.cache.state import init
  >>> import jax.numpy as jnp
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


def jit_when_eager(*static_argnames: str):
  """Decorator: an op called outside ``jit`` runs as one compiled program, not op by op.

  Called with traced arguments (inside the caller's ``jit``), the op is traced
  in line as before. Called eagerly, it runs through ``jax.jit(fn,
  static_argnames=...)``: compiled once per shape and static argument, then
  dispatched as one program (measured on CPU for ``plan_step`` at a small
  config: 1.4 s per eager call op by op against 0.4 ms jitted, and the first
  call 7.3 s against 2.2 s). Checked mode stays the eager one: a ``CacheState``
  the op returns is checked against ``config`` after the call (``enforce_checked``).
  Static arguments that cannot be hashed fall back to the op-by-op call.

  >>> @jit_when_eager("n")
  ... def shift(x, *, n):
  ...   return x + n
  >>> shift(jax.numpy.arange(3), n=2).tolist(), shift.jitted._cache_size()
  ([2, 3, 4], 1)
  """
  def wrap(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      static = [kwargs[n] for n in static_argnames if n in kwargs]
      dynamic = (args, {n: a for n, a in kwargs.items() if n not in static_argnames})
      if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(dynamic)):
        return fn(*args, **kwargs)
      try:
        hash(tuple(static))
      except TypeError:
        return fn(*args, **kwargs)
      out = jitted(*args, **kwargs)
      config = kwargs.get("config")
      for leaf in jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, CacheState)):
        if isinstance(leaf, CacheState):
          enforce_checked(leaf, config if isinstance(config, CacheConfig) else None)
      return out

    wrapper.jitted = jitted
    return wrapper

  return wrap
