"""Command-line plumbing shared by ``kvjax`` and ``kvjax replay``: the usage error, the
argument parser that raises it, and the memory guard every command checks first.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

class UsageError(ValueError):
  """A bad argument or environment; ``str()`` names the argument when there is one.

  >>> str(UsageError("must be positive, got 0", argument="--capacity"))
  'argument --capacity: must be positive, got 0'
  """

  def __init__(self, message: str, *, argument: Optional[str] = None):
    self.argument = argument
    super().__init__(message if argument is None else f"argument {argument}: {message}")


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose errors raise ``UsageError`` (one line, no exit)."""

  def error(self, message: str):
    raise UsageError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1.

  >>> positive_int("16")
  16
  """
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
  return value


def available_memory() -> Optional[int]:
  """Bytes of memory available now (Linux ``MemAvailable``, else free pages); None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, ValueError, OSError):
    return None


def memory_limit() -> tuple[int, str]:
  """(bytes, how it was set): ``min(MEMORY_CAP, MEMORY_SHARE * available memory)``."""
  avail = available_memory()
  if avail is None:
    return MEMORY_CAP, f"the fixed cap of {gib(MEMORY_CAP)}"
  share = int(avail * MEMORY_SHARE)
  if share < MEMORY_CAP:
    return share, f"{MEMORY_SHARE:.0%} of the {gib(avail)} available"
  return MEMORY_CAP, f"the fixed cap of {gib(MEMORY_CAP)}"


def gib(num_bytes: float) -> str:
  """``"1.5 GiB"``-style size.

  >>> gib(3 * 2 ** 29)
  '1.5 GiB'
  """
  return f"{num_bytes / 2 ** 30:.1f} GiB"


def check_memory(estimate: int, what: str, argument: str) -> None:
  """UsageError naming ``argument`` when ``estimate`` bytes exceed ``memory_limit()``."""
  limit, how = memory_limit()
  if estimate > limit:
    raise UsageError(f"{what} needs about {gib(estimate)} of memory (estimate), over the "
                     f"limit of {gib(limit)} ({how})", argument=argument)


MEMORY_CAP = 8 * 2 ** 30  # bytes: the most the CLI allocates, whatever the machine has


MEMORY_SHARE = 0.5        # of the memory available when the command starts
