"""The ``Policy`` bundle, the registry (``POLICIES``, ``register``, ``get_policy``,
``make_params``) and ``score_and_evict``."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from kvjax.layout.meta import PageMeta
from kvjax.policies.scoring import settle_all
from kvjax.policies.scoring import top_victims



class Policy(NamedTuple):
  """An eviction (and optional admission) policy: pure functions plus parameter specs."""

  name: str
  init: Callable[[int], Any]
  score: Callable[..., jax.Array]
  update: Callable[..., Any]
  admit: Optional[Callable[..., jax.Array]]
  defaults: dict          # {param: float default}
  bounds: dict            # {param: (low, high, low_open, high_open)}
  oracle: bool = False    # needs ``Access.next_use`` (simulator only)


def _no_state(num_pages: int):
  del num_pages
  return ()


def _no_update(state, meta, access, params):
  del meta, access, params
  return state


# ---------------------------------------------------------------------------- registry


def _stateless(fn):
  return lambda meta, state, clock, params: fn(meta, clock, params)


_OPEN = (0.0, 1e9, True, False)
_WEIGHT = (0.0, 100.0, False, False)

POLICIES: dict[str, Policy] = {}


def _settled(update):
  """``update`` that first applies the writes the previous update deferred."""
  return lambda state, meta, access, params: update(settle_all(state), meta, access, params)


def register(policy: Policy) -> Policy:
  """Add ``policy`` to ``POLICIES`` under its name (replacing any of the same name).

  Its ``update`` is wrapped to ``settle`` deferred writes first (see ``Deferred``).
  """
  policy = policy._replace(update=_settled(policy.update))
  POLICIES[policy.name] = policy
  return policy


def get_policy(name: str) -> Policy:
  """The registered policy called ``name``; ValueError listing the known names otherwise.

  >>> get_policy("lru").name
  'lru'
  """
  if name not in POLICIES:
    raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {name!r}")
  return POLICIES[name]


def make_params(policy, **overrides) -> dict:
  """Validated float32 parameters of ``policy`` (a name or ``Policy``): defaults + overrides.

  Raises:
    ValueError: an unknown parameter, or a value outside its range (named, with the value).

  >>> float(make_params("lfu", half_life=100)["half_life"])
  100.0
  """
  policy = get_policy(policy) if isinstance(policy, str) else policy
  unknown = sorted(set(overrides) - set(policy.defaults))
  if unknown:
    raise ValueError(f"policy {policy.name!r}: unknown parameter(s) {unknown}; "
                     f"known: {sorted(policy.defaults)}")
  values = {**policy.defaults, **overrides}
  for k, v in values.items():
    lo, hi, lo_open, hi_open = policy.bounds[k]
    v = float(v)
    bad = (math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi))
    if bad:
      interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
      raise ValueError(f"policy {policy.name!r}: parameter {k} must be in {interval}, got {v!r}")
  return {k: jnp.float32(v) for k, v in values.items()}


def score_and_evict(meta: PageMeta, policy_state, clock: jax.Array, n: int, policy,
                    params: Optional[dict] = None) -> tuple[jax.Array, jax.Array]:
  """Pick ``n`` pages to evict (or fill) with ``policy``: free pages first, in-use never.

  Args:
    meta: page metadata ([P] fields).
    policy_state: the policy's state (``policy.init(P)``, threaded through ``update``).
    clock: int32 [] current logical time.
    n: static number of pages wanted.
    policy: a ``Policy`` or a registered name.
    params: from ``make_params`` (defaults when None).

  Returns:
    ``(page_ids int32 [n], valid bool [n])``: best victim first; ``valid`` is False where
    fewer than ``n`` pages are evictable.

  >>> from kvjax.layout.meta import init_meta
  >>> m = init_meta(3, 1).replace(filled=jnp.ones(3, jnp.int32), last_access=jnp.array([5, 2, 7]))
  >>> ids, ok = score_and_evict(m, (), jnp.int32(9), 2, "lru")
  >>> ids.tolist(), ok.tolist()
  ([1, 0], [True, True])
  """
  policy = get_policy(policy) if isinstance(policy, str) else policy
  params = make_params(policy) if params is None else params
  return top_victims(policy.score(meta, policy_state, clock, params), n)
