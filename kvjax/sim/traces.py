"""Request traces as flat block-reference arrays: a Mooncake JSONL loader and a generator.

A trace is a list of requests; each request references the prefix blocks of its input in
order. ``Trace`` flattens them into per-reference arrays (host numpy) that the simulator
scans. Names in shapes: R = requests, N = block references.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from kvjax.policies.scoring import NEVER


DEFAULT_TRACE_DIR = os.environ.get("KVJAX_TRACE_DIR") or os.path.join(
    os.path.dirname(__file__), "..", "..", "..", "shared", "data", "traces")
MOONCAKE_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Trace:
  """Block references of a request trace (numpy, host side)."""

  name: str
  block_size: int           # tokens per block
  timestamp: np.ndarray     # int64 [R]  arrival time (ms)
  input_length: np.ndarray  # int64 [R]  input tokens
  output_length: np.ndarray  # int64 [R]  output tokens
  block: np.ndarray         # int32 [N]  dense block id (0..num_blocks-1, by first appearance)
  request: np.ndarray       # int32 [N]  request of each reference
  position: np.ndarray      # int32 [N]  block index within its request
  filled: np.ndarray        # int32 [N]  tokens in the block (< block_size for a partial last block)
  next_use: np.ndarray      # int32 [N]  index of the next reference to the same block (NEVER = none)

  @property
  def num_refs(self) -> int:
    return int(self.block.shape[0])

  @property
  def num_requests(self) -> int:
    return int(self.timestamp.shape[0])

  @property
  def num_blocks(self) -> int:
    return int(self.block.max()) + 1 if self.num_refs else 0

  def slice_requests(self, start: int, stop: int, name: Optional[str] = None) -> "Trace":
    """The trace of requests ``[start, stop)`` (ids, positions and next uses recomputed)."""
    bounds = np.searchsorted(self.request, np.arange(start, stop + 1))
    hashes = [self.block[bounds[i]:bounds[i + 1]].tolist() for i in range(stop - start)]
    return from_requests(hashes, self.input_length[start:stop], self.output_length[start:stop],
                         self.timestamp[start:stop], block_size=self.block_size,
                         name=name or f"{self.name}[{start}:{stop}]")


def next_uses(block: np.ndarray) -> np.ndarray:
  """int32 [N]: for each reference, the index of the next reference to the same block.

  >>> next_uses(np.array([3, 1, 3, 3])).tolist()[:3]
  [2, 1073741824, 3]
  """
  out = np.full(block.shape[0], NEVER, np.int64)
  last = {}
  for i in range(block.shape[0] - 1, -1, -1):
    b = int(block[i])
    out[i] = last.get(b, NEVER)
    last[b] = i
  return out.astype(np.int32)


def from_requests(hash_ids: Sequence[Sequence[int]], input_length, output_length=None,
                  timestamp=None, *, block_size: int = MOONCAKE_BLOCK,
                  name: str = "trace") -> Trace:
  """Build a ``Trace`` from per-request prefix-block hash ids.

  Args:
    hash_ids: R lists of block hash ids (any hashable ints), one per request.
    input_length: R input token counts (the last block holds the remainder).
    output_length, timestamp: R values each (zeros when None).
    block_size: tokens per block.
    name: a label for tables.

  >>> t = from_requests([[7, 8], [7, 9]], [600, 1024])
  >>> t.block.tolist(), t.filled.tolist()
  ([0, 1, 0, 2], [512, 88, 512, 512])
  """
  r = len(hash_ids)
  input_length = np.asarray(input_length, np.int64).reshape(r)
  output_length = np.zeros(r, np.int64) if output_length is None else np.asarray(
      output_length, np.int64).reshape(r)
  timestamp = np.zeros(r, np.int64) if timestamp is None else np.asarray(timestamp,
                                                                        np.int64).reshape(r)
  ids: dict = {}
  block, request, position, filled = [], [], [], []
  for i, hs in enumerate(hash_ids):
    n = len(hs)
    for j, h in enumerate(hs):
      block.append(ids.setdefault(h, len(ids)))
      request.append(i)
      position.append(j)
      rest = int(input_length[i]) - j * block_size
      filled.append(max(1, min(block_size, rest)) if j == n - 1 else block_size)
  block = np.asarray(block, np.int32)
  return Trace(name=name, block_size=block_size, timestamp=timestamp, input_length=input_length,
               output_length=output_length, block=block,
               request=np.asarray(request, np.int32), position=np.asarray(position, np.int32),
               filled=np.asarray(filled, np.int32), next_use=next_uses(block))


_FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_INT64_LIMIT = 2 ** 63
_FORMAT_HINT = ("replay needs per-request block hashes: Mooncake-style JSONL, one JSON object "
                "per line with timestamp, input_length, output_length and hash_ids")


class TraceError(ValueError):
  """A trace file that cannot be replayed; ``str()`` is ``"<path>:<line>: <what>"``.

  Args:
    path: the file.
    line: 1-based line number, or None when the problem is the whole file.
    message: what is wrong, and where useful what replay needs instead.

  >>> str(TraceError("t.jsonl", 3, "malformed JSON"))
  't.jsonl:3: malformed JSON'
  """

  def __init__(self, path: str, line: Optional[int], message: str):
    self.path, self.line, self.message = str(path), line, message
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {message}")


def _short(value) -> str:
  """A repr of ``value`` that stays short (huge integers, long lists)."""
  if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
    return f"an integer of {value.bit_length()} bits"
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str):
  raise ValueError(f"{name} is not a valid JSON number")


def _count(rec: dict, key: str, path: str, lineno: int) -> int:
  """``rec[key]`` as a non-negative integer that fits in int64 (``10.0`` is accepted)."""
  v = rec[key]
  ok = not isinstance(v, bool) and (
      isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v == int(v)))
  if not ok or not 0 <= int(v) < _INT64_LIMIT:
    raise TraceError(path, lineno, f"{key} must be a non-negative integer below 2^63, got "
                     f"{_short(v)}")
  return int(v)


def _parse_record(line: str, path: str, lineno: int, first: bool) -> dict:
  """The JSON object of one line; TraceError naming the line otherwise."""
  try:
    rec = json.loads(line, parse_constant=_reject_constant)
  except (ValueError, RecursionError) as e:
    if first and "," in line and not line.lstrip().startswith(("{", "[")):
      raise TraceError(path, lineno, f"this looks like a CSV file (first line "
                       f"{_short(line.strip())}), not a JSONL trace; {_FORMAT_HINT}. CSV traces "
                       "such as Azure's carry no block hashes") from None
    if isinstance(e, json.JSONDecodeError):
      why = f"malformed JSON ({e.msg} at column {e.colno})"
    elif isinstance(e, RecursionError):
      why = "malformed JSON (nested too deeply)"
    else:  # NaN / Infinity, or an integer literal past Python's digit limit
      why = f"invalid number ({e})"
    raise TraceError(path, lineno, why) from None
  if not isinstance(rec, dict):
    raise TraceError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
  missing = [k for k in _FIELDS if k not in rec]
  if missing:
    hint = f"; {_FORMAT_HINT}" if "hash_ids" in missing else ""
    raise TraceError(path, lineno, f"missing field(s) {missing}{hint}")
  return rec


def load_mooncake(path: str, *, block_size: int = MOONCAKE_BLOCK,
                  max_requests: Optional[int] = None) -> Trace:
  """Load a Mooncake-format JSONL trace (``timestamp``, ``input_length``, ``output_length``,
  ``hash_ids`` of prefix blocks).

  Lengths and timestamps must be non-negative integers below 2^63 (``NaN``, ``Infinity``
  and fractions are refused); ``hash_ids`` must hold ``ceil(input_length / block_size)``
  integers. Blank lines are skipped.

  Raises:
    TraceError: (a ``ValueError``) naming the file, and the line of a bad line: a file that
      cannot be read (missing, a directory), bytes that are not UTF-8, malformed JSON, a CSV
      file, a missing or invalid field.

  >>> import tempfile, os
  >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
  >>> _ = open(p, "w").write('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [4]}\\n')
  >>> load_mooncake(p).num_refs
  1
  """
  hashes, inp, out, ts = [], [], [], []
  try:
    f = open(path, "rb")
  except OSError as e:
    raise TraceError(path, None, f"cannot read the trace ({e.strerror or e})") from None
  with f:
    lineno = 0
    try:
      for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(b"\x1f\x8b"):
          raise TraceError(path, 1, "this is a gzip-compressed file; decompress it first")
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise TraceError(path, lineno, f"not UTF-8 text (byte {raw[e.start:e.start + 1]!r} "
                           f"at column {e.start + 1})") from None
        if not line.strip():
          continue
        if max_requests is not None and len(hashes) >= max_requests:
          break
        rec = _parse_record(line, path, lineno, first=not hashes)
        counts = {k: _count(rec, k, path, lineno) for k in _FIELDS[:3]}
        hs = rec["hash_ids"]
        if not isinstance(hs, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in hs):
          raise TraceError(path, lineno, f"hash_ids must be a list of integers, got {_short(hs)}")
        if len(hs) != math.ceil(counts["input_length"] / block_size):
          raise TraceError(path, lineno, f"len(hash_ids)={len(hs)} does not match "
                           f"ceil(input_length={counts['input_length']}/{block_size})")
        hashes.append(hs)
        inp.append(counts["input_length"])
        out.append(counts["output_length"])
        ts.append(counts["timestamp"])
    except OSError as e:  # e.g. an I/O error part way through
      raise TraceError(path, lineno or None, f"cannot read the trace ({e.strerror or e})") from None
  return from_requests(hashes, inp, out, ts, block_size=block_size,
                       name=os.path.splitext(os.path.basename(path))[0])


def generate(num_requests: int = 2000, *, seed: int = 0, block_size: int = MOONCAKE_BLOCK,
             num_prompts: int = 20, prompt_blocks: tuple = (1, 8), turns: tuple = (1, 8),
             user_tokens: tuple = (50, 3000), output_tokens: tuple = (20, 800),
             zipf: float = 1.2, concurrent: int = 64, name: Optional[str] = None) -> Trace:
  """A seeded synthetic multi-turn chat trace with shared system prompts.

  Each conversation starts from one of ``num_prompts`` system prompts (Zipf popularity);
  each turn's input is the previous input plus the previous answer plus a new user
  message, so full blocks of earlier turns are reused as prefixes while the partial last
  block is not. ``concurrent`` conversations are interleaved at random.

  Args:
    num_requests: requests to produce.
    seed: numpy RNG seed (the same seed gives the same trace).
    block_size: tokens per block.
    num_prompts, prompt_blocks: shared prompts and their length range in full blocks.
    turns, user_tokens, output_tokens: uniform ranges per conversation / message.
    zipf: Zipf exponent of prompt popularity.
    concurrent: conversations open at once.

  >>> generate(50, seed=1).num_requests
  50
  """
  if num_requests <= 0:
    raise ValueError(f"num_requests must be positive, got {num_requests}")
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, num_prompts + 1) ** zipf
  weights /= weights.sum()
  prompt_len = rng.integers(prompt_blocks[0], prompt_blocks[1] + 1, num_prompts) * block_size
  next_seg = [num_prompts]

  def new_conv():
    p = int(rng.choice(num_prompts, p=weights))
    return {"segs": [(p, int(prompt_len[p]))], "turns_left": int(rng.integers(*turns) + 1)}

  convs = [new_conv() for _ in range(concurrent)]
  hashes, inp, out, ts = [], [], [], []
  ids: dict = {}
  t = 0
  for _ in range(num_requests):
    k = int(rng.integers(concurrent))
    c = convs[k]
    c["segs"].append((next_seg[0], int(rng.integers(*user_tokens))))
    next_seg[0] += 1
    total = sum(n for _, n in c["segs"])
    hs, parent, seg_i, offset = [], -1, 0, 0
    for j in range(math.ceil(total / block_size)):
      take, pieces = min(block_size, total - j * block_size), []
      while take:
        sid, n = c["segs"][seg_i]
        step = min(take, n - offset)
        pieces.append((sid, offset, step))
        take -= step
        offset += step
        if offset == n:
          seg_i, offset = seg_i + 1, 0
      parent = ids.setdefault((parent, tuple(pieces)), len(ids))
      hs.append(parent)
    o = int(rng.integers(*output_tokens))
    hashes.append(hs)
    inp.append(total)
    out.append(o)
    t += int(rng.exponential(300.0))
    ts.append(t)
    c["segs"].append((next_seg[0], o))
    next_seg[0] += 1
    c["turns_left"] -= 1
    if c["turns_left"] <= 0:
      convs[k] = new_conv()
  return from_requests(hashes, inp, out, ts, block_size=block_size,
                       name=name or f"generated-{num_requests}-s{seed}")


def default_trace_path(name: str = "conversation_trace.jsonl") -> str:
  """Path of a shared real trace (may not exist on every machine)."""
  return os.path.normpath(os.path.join(DEFAULT_TRACE_DIR, name))
