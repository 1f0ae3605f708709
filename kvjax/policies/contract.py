"""The policy contract: ``Policy``, ``Admission``, ``Bound``; the registry (``POLICIES``,
``register``, ``get_policy``, ``make_params``); ``with_admission``; ``score_and_evict``.

Every function of a policy takes its own state first, then the page metadata, then what
the call is about, then the parameters:

* ``init(num_pages) -> state``
* ``score(state, meta, clock, params) -> float32 [P]``
* ``update(state, meta, access, params) -> state``
* ``admit(state, meta, access, victim, params) -> bool []``
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kvjax.layout.meta import PageMeta
from kvjax.policies.scoring import settle_all
from kvjax.policies.scoring import top_victims


@dataclasses.dataclass(frozen=True)
class Bound:
  """The interval a parameter's value must lie in (closed ends unless ``*_open``).

  >>> b = Bound(0.0, 1.0, high_open=True)
  >>> str(b), b.contains(0.0), b.contains(1.0)
  ('[0, 1)', True, False)
  """

  low: float
  high: float
  low_open: bool = False
  high_open: bool = False

  def contains(self, value: float) -> bool:
    """True when the float ``value`` lies in the interval (NaN never does)."""
    v = float(value)
    return not (math.isnan(v) or v < self.low or v > self.high
                or (self.low_open and v == self.low) or (self.high_open and v == self.high))

  def __str__(self) -> str:
    return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
            f"{')' if self.high_open else ']'}")


POSITIVE = Bound(0.0, 1e9, low_open=True)  # a time scale or half-life, in steps
WEIGHT = Bound(0.0, 100.0)                 # a non-negative mixing weight
FRACTION = Bound(0.0, 1.0)                 # a share, or a 0/1 switch


def _check_specs(kind: str, name: str, defaults: dict, bounds: dict) -> None:
  if set(defaults) != set(bounds):
    raise ValueError(f"{kind} {name!r}: defaults {sorted(defaults)} and bounds "
                     f"{sorted(bounds)} must name the same parameters")
  for k, b in bounds.items():
    if not isinstance(b, Bound):
      raise ValueError(f"{kind} {name!r}: bound of {k} must be a Bound, got {b!r}")
    if not b.contains(defaults[k]):
      raise ValueError(f"{kind} {name!r}: default {k}={defaults[k]!r} is outside {b}")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Policy:
  """An eviction policy (with an optional admission filter): pure functions plus the
  specs of its float parameters. Built with keywords only; compared by identity.

  >>> p = Policy(name="oldest", init=no_state, score=stateless(lambda m, c, prm: m.filled),
  ...            update=no_update)
  >>> p.admit is None, p.defaults
  (True, {})
  """

  name: str
  init: Callable[[int], Any]                      # (num_pages) -> state
  score: Callable[..., jax.Array]                 # (state, meta, clock, params) -> f32 [P]
  update: Callable[..., Any]                      # (state, meta, access, params) -> state
  admit: Optional[Callable[..., jax.Array]] = None  # (state, meta, access, victim, params) -> bool []
  defaults: dict = dataclasses.field(default_factory=dict)  # {param: float default}
  bounds: dict = dataclasses.field(default_factory=dict)    # {param: Bound}
  oracle: bool = False                            # needs ``Access.next_use`` (simulator only)

  def __post_init__(self):
    _check_specs("policy", self.name, self.defaults, self.bounds)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Admission:
  """An admission filter on its own, composable with any ``Policy`` (``with_admission``):
  it keeps its own state, sees every reference, and decides whether a missing block may
  take the victim's page.

  Functions: ``init(num_pages) -> state``, ``update(state, meta, access, params) ->
  state``, ``admit(state, meta, access, victim, params) -> bool []``.

  >>> a = Admission(name="all", init=no_state, update=no_update,
  ...               admit=lambda s, m, a, v, prm: jnp.bool_(True))
  >>> with_admission(get_policy("lru"), a).name
  'all-lru'
  """

  name: str
  init: Callable[[int], Any]
  update: Callable[..., Any]
  admit: Callable[..., jax.Array]
  defaults: dict = dataclasses.field(default_factory=dict)  # {param: float default}
  bounds: dict = dataclasses.field(default_factory=dict)    # {param: Bound}

  def __post_init__(self):
    _check_specs("admission", self.name, self.defaults, self.bounds)


def no_state(num_pages: int):
  """``init`` of a policy without history: ``()``."""
  del num_pages
  return ()


def no_update(state, meta, access, params):
  """``update`` of a policy without history: the state unchanged."""
  del meta, access, params
  return state


def stateless(fn: Callable) -> Callable:
  """A policy ``score`` from ``fn(meta, clock, params)``, which needs no state."""
  return lambda state, meta, clock, params: fn(meta, clock, params)


# ---------------------------------------------------------------------------- registry


POLICIES: dict[str, Policy] = {}


def _settled(update):
  """``update`` that first applies the writes the previous update deferred."""
  return lambda state, meta, access, params: update(settle_all(state), meta, access, params)


def register(policy: Policy) -> Policy:
  """Add ``policy`` to ``POLICIES`` under its name (replacing any of the same name).

  Its ``update`` is wrapped to ``settle`` deferred writes first (see ``Deferred``).
  Returns the registered policy.
  """
  if not isinstance(policy, Policy):
    raise ValueError(f"register takes a Policy, got {type(policy).__name__}")
  policy = dataclasses.replace(policy, update=_settled(policy.update))
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
  """Validated float32 [] parameters of ``policy`` (a name or ``Policy``): defaults + overrides.

  Raises:
    ValueError: an unknown parameter, or a value outside its ``Bound`` (named, with the
      value).

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
    if not policy.bounds[k].contains(v):
      raise ValueError(f"policy {policy.name!r}: parameter {k} must be in "
                       f"{policy.bounds[k]}, got {float(v)!r}")
  return {k: jnp.float32(v) for k, v in values.items()}


# ---------------------------------------------------------------------------- admission


class AdmittedState(NamedTuple):
  """State of a policy composed with an admission filter (``with_admission``)."""

  policy: Any     # the eviction policy's state
  admission: Any  # the admission filter's state


def with_admission(policy: Policy, admission: Admission,
                   name: Optional[str] = None) -> Policy:
  """``policy`` whose misses must also pass ``admission``.

  The composed policy scores with ``policy``; every reference updates both states; a
  missing block takes the victim's page only if both ``policy.admit`` (where it has one)
  and ``admission.admit`` agree. Parameters are the union of both (a name in both
  raises ValueError). Named ``f"{admission.name}-{policy.name}"`` unless ``name``.

  >>> from kvjax.policies.frequency import TINYLFU_ADMISSION
  >>> p = with_admission(get_policy("fifo"), TINYLFU_ADMISSION)
  >>> p.name, sorted(p.defaults)
  ('tinylfu-fifo', ['partial_margin', 'sample_factor'])
  """
  clash = sorted(set(policy.defaults) & set(admission.defaults))
  if clash:
    raise ValueError(f"policy {policy.name!r} and admission {admission.name!r} both have "
                     f"parameter(s) {clash}")

  def init(num_pages):
    return AdmittedState(policy=policy.init(num_pages), admission=admission.init(num_pages))

  def score(state, meta, clock, params):
    return policy.score(state.policy, meta, clock, params)

  def update(state, meta, access, params):
    state = settle_all(state)
    return AdmittedState(policy=policy.update(state.policy, meta, access, params),
                         admission=admission.update(state.admission, meta, access, params))

  def admit(state, meta, access, victim, params):
    ok = (policy.admit(state.policy, meta, access, victim, params)
          if policy.admit is not None else True)
    return ok & admission.admit(state.admission, meta, access, victim, params)

  return Policy(name=name or f"{admission.name}-{policy.name}", init=init, score=score,
                update=update, admit=admit,
                defaults={**admission.defaults, **policy.defaults},
                bounds={**admission.bounds, **policy.bounds}, oracle=policy.oracle)


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
  return top_victims(policy.score(policy_state, meta, clock, params), n)
