"""Command-line plumbing shared by ``kvjax`` and ``kvjax replay``: the usage error, the
argument parser that raises it, the memory guard every command checks first, and
the persistent compilation cache the commands share across runs.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

import jax


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


def _int_at_least(text: str, low: int, what: str) -> int:
  """``int(text)`` if it is >= ``low``, else ``argparse.ArgumentTypeError`` "must be ``what``"."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
  if value < low:
    raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
  return value


def positive_int(text: str) -> int:
  """argparse type: an integer >= 1.

  >>> positive_int("16")
  16
  """
  return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
  """argparse type: an integer >= 0.

  >>> nonnegative_int("0")
  0
  """
  return _int_at_least(text, 0, "an integer >= 0")


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


COMPILE_CACHE_ENV = "KVJAX_COMPILE_CACHE"   # a folder, or "off"


def compile_cache_dir() -> Optional[str]:
  """The folder of the CLI's persistent XLA compilation cache, or None when off.

  ``$KVJAX_COMPILE_CACHE`` when set ("off" or empty: no cache), else
  ``$XDG_CACHE_HOME/kvjax/xla`` (``~/.cache/kvjax/xla``).

  >>> from unittest import mock
  >>> with mock.patch.dict(os.environ, {"KVJAX_COMPILE_CACHE": "off"}):
  ...   compile_cache_dir() is None
  True
  """
  return user_cache_dir(COMPILE_CACHE_ENV, "xla")


def is_off(value: Optional[str]) -> bool:
  """Whether a folder setting (an environment variable, ``--l3-dir``) says none: "off" or
  empty, in any case.

  >>> is_off("OFF"), is_off(" "), is_off("/tmp/x"), is_off(None)
  (True, True, False, False)
  """
  return value is not None and value.strip().lower() in ("", "off")


def user_cache_dir(env: str, name: str) -> Optional[str]:
  """``$env`` when set ("off" or empty: None), else ``$XDG_CACHE_HOME/kvjax/name``
  (``~/.cache/kvjax/name``): the folder of one of kvjax's caches kept between runs.

  >>> from unittest import mock
  >>> with mock.patch.dict(os.environ, {"KVJAX_X": "/tmp/x"}):
  ...   user_cache_dir("KVJAX_X", "x")
  '/tmp/x'
  """
  value = os.environ.get(env)
  if value is not None:
    return None if is_off(value) else value
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "kvjax", name)


def enable_compile_cache(path: Optional[str] = None) -> Optional[str]:
  """Turn on JAX's persistent compilation cache in ``path`` (default ``compile_cache_dir()``).

  A step shape compiled once is loaded from disk by later runs instead of
  compiled again. Every program is stored, however quickly it compiles (unless
  ``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise): with a floor
  of 0.5 s, the tiered demo over a warm L3 compiled its small programs again
  in every run and its first token came 8.7-9.8 s after start, against
  6.2-7.0 s with every program stored (the plain demo: no change, 3.5-4.5 s;
  the folder 880 KB against 776 KB). Returns the
  folder, or None when off or when it cannot be created (the run goes on
  without a cache).
  """
  path = compile_cache_dir() if path is None else path
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
