"""Pure-Python spellings of the documented hash mixers, shared by the hashing and index tests."""

M32 = 0xFFFFFFFF


def fmix_py(h: int) -> int:
  """MurmurHash3's 32-bit finalizer on a Python int."""
  h ^= h >> 16
  h = (h * 0x85EBCA6B) & M32
  h ^= h >> 13
  h = (h * 0xC2B2AE35) & M32
  return h ^ (h >> 16)
