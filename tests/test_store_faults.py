"""Faults that must lose nothing, in both layouts where the files differ: flipped bytes in
page files (every one caught), a file holding another page, a deleted file, a corrupt journal
record, SIGKILL of a writing child process, and a full disk (a file-size limit in a child
process)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from kvjax.store import hash_keys
from test_store import hashes_of
from test_store import info_of
from test_store import open_store
from test_store import page_span
from test_store import pages_of
from test_store import same_bytes

TESTS = str(pathlib.Path(__file__).resolve().parent)
LAYOUTS = pytest.mark.parametrize("layout", ["segments", "chunks"])


def check_found(store, ids, want_found):
  """get(ids): found is want_found, and every page found is the one put, byte for byte."""
  r = store.get(hashes_of(ids))
  assert r.found.tolist() == list(want_found)
  live = [i for i, f in zip(ids, want_found) if f]
  assert same_bytes({k: a[r.found] for k, a in r.arrays.items()}, pages_of(live))
  np.testing.assert_array_equal(r.info.tokens[r.found], info_of(live).tokens)


@pytest.fixture
def fast_dir(tmp_path):
  """A directory on tmpfs where there is one (file opens there cost microseconds, not ms)."""
  shm = "/dev/shm"
  if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
    yield tmp_path
    return
  path = tempfile.mkdtemp(prefix="kvjax-store-", dir=shm)
  try:
    yield pathlib.Path(path)
  finally:
    shutil.rmtree(path, ignore_errors=True)


@LAYOUTS
def test_every_flipped_byte_is_caught(fast_dir, layout):
  tmp_path = fast_dir
  store = open_store(tmp_path, capacity=8, layout=layout)
  ids = list(range(8))
  for i in ids:   # a put each: eight appends to one segment, or eight chunks
    store.put(hashes_of([i]), pages_of([i]), info_of([i]))
  rng = np.random.default_rng(0)
  _, lo, hi = page_span(store, tmp_path, 0)
  assert hi - lo > store.format.page_bytes // 2
  # every byte of one page (a chunk's header, compressed body and crc trailer; a segment's
  # row), then random bytes of random pages; offsets within the page's bytes, wherever its
  # recomputed copy lands
  trials = [(0, off) for off in range(hi - lo)]
  for _ in range(60):
    pid = int(rng.integers(0, 8))
    _, lo, hi = page_span(store, tmp_path, pid)
    trials.append((pid, int(rng.integers(0, hi - lo))))
  for pid, rel in trials:
    path, lo, _ = page_span(store, tmp_path, pid)
    off = lo + rel
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[off] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(flipped))
    check_found(store, ids, [i != pid for i in ids])   # a miss, never returned
    assert not store.contains(hashes_of([pid]))[0]     # and unlisted
    path.write_bytes(data)
    store.put(hashes_of([pid]), pages_of([pid]), info_of([pid]))   # recomputed
  s = store.stats()
  assert s["checksum_failures"] == len(trials) and s["futures_outstanding"] == 0


@LAYOUTS
def test_a_file_holding_another_page_is_caught_by_the_page_checksum(tmp_path, layout):
  store = open_store(tmp_path, capacity=4, layout=layout)
  store.put(hashes_of([0, 1]), pages_of([0, 1]), info_of([0, 1]))
  # another page's valid bytes (a chunk's codec checksum holds) where page 0's belong:
  # only the page crc sees it
  p0, lo0, hi0 = page_span(store, tmp_path, 0)
  p1, lo1, hi1 = page_span(store, tmp_path, 1)
  data = bytearray(p0.read_bytes())
  data[lo0:hi0] = p1.read_bytes()[lo1:hi1]
  p0.write_bytes(bytes(data))
  check_found(store, [0, 1], [False, True])
  assert store.stats()["checksum_failures"] == 1


@LAYOUTS
def test_a_deleted_file_is_a_miss(tmp_path, layout):
  # segments of one page each: page 1's file is its own
  store = open_store(tmp_path, capacity=4, layout=layout, segment_bytes=1)
  for i in (0, 1):
    store.put(hashes_of([i]), pages_of([i]), info_of([i]))
  os.remove(page_span(store, tmp_path, 1)[0])
  check_found(store, [0, 1], [True, False])
  s = store.stats()
  assert (s["missing_files"], s["checksum_failures"], s["misses"]) == (1, 0, 1)
  store.put(hashes_of([1]), pages_of([1]), info_of([1]))
  check_found(store, [0, 1], [True, True])


def test_a_corrupt_journal_record_stops_the_replay_there(tmp_path):
  store = open_store(tmp_path, capacity=16)
  for b in range(3):
    ids = [2 * b, 2 * b + 1]
    store.put(hashes_of(ids), pages_of(ids), info_of(ids))
  del store
  journals = sorted((tmp_path / "index").glob("journal-*"))
  assert len(journals) == 3
  data = bytearray(journals[1].read_bytes())
  data[len(data) // 2] ^= 0x40
  journals[1].write_bytes(bytes(data))
  again = open_store(tmp_path, capacity=16)
  assert again.stats()["corrupt_index_records"] == 1 and again.warm_pages == 2
  check_found(again, list(range(6)), [True, True, False, False, False, False])
  again.put(hashes_of([10]), pages_of([10]), info_of([10]))   # record 2 anew; old 3 is gone
  del again
  third = open_store(tmp_path, capacity=16)
  check_found(third, [0, 1, 2, 4, 10], [True, True, False, False, True])


WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_store import hashes_of, info_of, open_store, pages_of
every = int(sys.argv[5])   # StoreConfig.commit_every: a group's puts are committed together
# grouped: the deferred fsync path runs; no timed commit inside a group (killed anyway)
store = open_store(sys.argv[2], capacity=int(sys.argv[3]), commit_every=every,
                   sync=every > 1, commit_seconds=600.0)
i, puts = int(sys.argv[4]), 0
while True:
  ids = list(range(i, i + 4))
  store.put(hashes_of(ids), pages_of(ids), info_of(ids))
  i, puts = i + 4, puts + 1
  if puts % every == 0:
    print(i, flush=True)   # every id below i is committed
"""


@pytest.mark.parametrize("every", [1, 4], ids=["per-put", "grouped"])
def test_sigkill_in_the_middle_of_writes_restarts_warm_and_consistent(tmp_path, every):
  capacity, batch, start = 24, 4, 0
  group = batch * every   # ids a commit makes durable
  rng = np.random.default_rng(1)
  for round_ in range(2):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, TESTS, str(tmp_path), str(capacity),
                             str(start), str(every)], stdout=subprocess.PIPE, text=True)
    committed, target = start, start + 36 + group * int(rng.integers(0, 4))
    for line in proc.stdout:
      committed = int(line)
      if committed >= target:
        break
    time.sleep(float(rng.uniform(0, 0.004 * every)))
    os.kill(proc.pid, signal.SIGKILL)   # most likely inside the next put (or group)
    proc.wait()
    # the writer may have committed more than we had read when it was killed (a loaded
    # machine): the pipe still holds their lines
    for line in proc.stdout.read().split():
      committed = int(line)
    proc.stdout.close()
    assert committed >= target, f"the writer stopped early (round {round_})"
    store = open_store(tmp_path, capacity=capacity)
    ids = list(range(committed + group))   # the put or group in flight may or may not be listed
    listed = store.contains(hashes_of(ids))
    r = store.get(hashes_of(ids))
    assert r.found.tolist() == listed.tolist()     # every listed page reads back intact
    live = [i for i in ids if listed[i]]
    assert same_bytes({k: a[r.found] for k, a in r.arrays.items()}, pages_of(live))
    np.testing.assert_array_equal(r.info.tokens[r.found], info_of(live).tokens)
    s = store.stats()
    assert s["checksum_failures"] == s["missing_files"] == s["read_errors"] == 0
    # the last commit we read survived, or the one in flight (made durable before the kill
    # reached its print) survived too; either way that commit is whole (the one in flight
    # may have evicted the first ids of the one before: capacity < 2 groups)
    end = max(live) + 1
    assert end in (committed, committed + group) and listed[end - group:end].all()
    if every == 1:
      assert store.warm_pages >= capacity - batch      # warm: at most one batch of evictions
    else:
      # a group's evictions and pages share one record: the store is the LRU window of the
      # last commit, the one we read or the one in flight, never a state between puts
      assert live == list(range(end - capacity, end))
    # what the killed put left is gone: no segment file that no record lists (a cut-off
    # append to a listed segment leaves unlisted rows at its end, never read)
    files = os.listdir(tmp_path / "segments")
    assert {int(n.split(".")[0]) for n in files} == set(store.index.seg_live), files
    start = committed + group
    del store


FULL_DISK = r"""
import json, resource, signal, sys
sys.path.insert(0, sys.argv[1])
from test_store import hashes_of, info_of, open_store, pages_of, same_bytes
from kvjax.store import StoreWriteError
store = open_store(sys.argv[2], capacity=16)
store.put(hashes_of(range(4)), pages_of(range(4)), info_of(range(4)))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))   # a page's chunk is larger
errors, listed = [], []
for b in range(3):
  ids = list(range(10 + 4 * b, 14 + 4 * b))
  try:
    listed.append(store.put(hashes_of(ids), pages_of(ids), info_of(ids)).tolist())
  except StoreWriteError as err:
    errors.append(str(err))
    listed.append(err.listed.tolist())
r = store.get(hashes_of(range(4)))
print(json.dumps({"errors": errors, "listed": listed, "found": r.found.tolist(),
                  "intact": same_bytes(r.arrays, pages_of(range(4))), "stats": store.stats()}))
"""


def test_a_full_disk_gives_one_clear_error_and_reads_go_on(tmp_path):
  out = subprocess.run([sys.executable, "-c", FULL_DISK, TESTS, str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert len(res["errors"]) == 1, res["errors"]
  assert "write failed" in res["errors"][0] and "too large" in res["errors"][0].lower()
  assert res["listed"] == [[False] * 4] * 3
  assert res["found"] == [True] * 4 and res["intact"]
  assert res["stats"]["writes_refused"] == 8 and not res["stats"]["writes_enabled"]
  store = open_store(tmp_path, capacity=16)   # a restart: what was committed, nothing else
  check_found(store, list(range(4)) + [10, 14], [True] * 4 + [False, False])
  store.put(hashes_of([10]), pages_of([10]), info_of([10]))
  check_found(store, [10], [True])


HOLDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from test_store import open_store
from kvjax.store import StoreBusyError
try:
  store = open_store(sys.argv[2], capacity=16)
except StoreBusyError as err:
  print("busy", err, flush=True)
  sys.exit(3)
print("open", flush=True)
sys.stdin.read()   # hold the directory until killed
"""


def test_one_store_opens_a_directory_at_a_time(tmp_path):
  # A second open would delete the first's uncommitted segment (no record lists it yet) and
  # overwrite its records: it is refused, in this process and in another, and the first
  # store loses nothing; close, or the kill of the process holding it, lets it go.
  from kvjax.store import StoreBusyError
  first = open_store(tmp_path, capacity=16, commit_every=4, commit_seconds=600.0)
  first.put(hashes_of(range(4)), pages_of(range(4)), info_of(range(4)))   # not committed yet
  with pytest.raises(StoreBusyError, match="open in another BlockStore"):
    open_store(tmp_path, capacity=16)
  child = subprocess.run([sys.executable, "-c", HOLDER, TESTS, str(tmp_path)],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
  assert child.returncode == 3 and child.stdout.startswith("busy"), child.stderr
  check_found(first, list(range(4)), [True] * 4)   # its pending segment is still there
  first.close()
  again = open_store(tmp_path, capacity=16)
  check_found(again, list(range(4)), [True] * 4)
  again.close()
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, TESTS, str(tmp_path)],
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "open"
    with pytest.raises(StoreBusyError):
      open_store(tmp_path, capacity=16)
  finally:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    holder.stdin.close()
  check_found(open_store(tmp_path, capacity=16), list(range(4)), [True] * 4)
