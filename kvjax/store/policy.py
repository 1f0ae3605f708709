"""When a tier writes a page to the store: ``WritePolicy`` (HiCache's three modes).

The tier asks ``policy.wants(event, hits)`` at each event of a page it holds:

* ``"insert"``: the page entered the tier above (filled, or promoted);
* ``"hit"``: the tier above served it (``hits`` = its hits so far, this one included);
* ``"evict"``: the tier above drops it.

``write_through`` writes on insert, ``write_back`` on eviction,
``write_through_selective`` once a page has been hit ``hits`` times (a page
never hit that often is not worth the disk bandwidth; on eviction it is
dropped). ``BlockStore.put`` skips pages it already holds, so asking twice
costs a lookup, not a write.

>>> WritePolicy("write_through_selective", hits=2).wants("hit", 1)
False
>>> WritePolicy("write_through_selective", hits=2).wants("hit", 2)
True
>>> WritePolicy("write_back").wants("evict", 0)
True
"""

from __future__ import annotations

import dataclasses

MODES = ("write_through", "write_back", "write_through_selective")
EVENTS = ("insert", "hit", "evict")


@dataclasses.dataclass(frozen=True)
class WritePolicy:
  """mode: one of ``MODES``; hits: the hit count that triggers a selective write (>= 1)."""

  mode: str = "write_through"
  hits: int = 1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"WritePolicy.mode must be one of {MODES}, got {self.mode!r}")
    if not isinstance(self.hits, int) or self.hits < 1:
      raise ValueError(f"WritePolicy.hits must be an int >= 1, got {self.hits!r}")

  def wants(self, event: str, hits: int = 0) -> bool:
    """Whether a page should be written to the store at ``event`` with ``hits`` so far."""
    if event not in EVENTS:
      raise ValueError(f"event must be one of {EVENTS}, got {event!r}")
    if self.mode == "write_through":
      return event == "insert"
    if self.mode == "write_back":
      return event == "evict"
    return event == "hit" and hits >= self.hits
