"""SmolLM2's byte-level BPE tokenizer, built from GGUF metadata, and its ChatML template."""

from __future__ import annotations

from typing import Sequence

from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import Tokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IM_END_ID = 2  # SmolLM2's id of <|im_end|> (its end-of-turn and EOS)

# The template shipped in SmolLM2's GGUF puts this system turn first when none is given.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

_CONTROL = 3  # gguf TokenType.CONTROL


def build_tokenizer(tokens: Sequence[str], merges: Sequence[str],
                    special: Sequence[str] = ()) -> Tokenizer:
  """A byte-level BPE ``tokenizers.Tokenizer`` from a vocabulary and merge list.

  Digits are split one by one before the byte-level split, as SmolLM2's own
  tokenizer does; ``special`` tokens are matched whole and never split.

  Args:
    tokens: the vocabulary, id order (byte-level strings, "Ġ" for a space).
    merges: BPE merges in rank order, each "left right".
    special: tokens to add as special (e.g. "<|im_start|>").

  >>> tok = build_tokenizer(["a", "b", "ab", "<s>"], ["a b"], ["<s>"])
  >>> tok.encode("<s>ab", add_special_tokens=False).ids
  [3, 2]
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"tokens: {len(tokens) - len(vocab)} duplicate entries")
  pairs = []
  for m in merges:
    parts = m.split(" ")
    if len(parts) != 2:
      raise ValueError(f"merges: expected 'left right', got {m!r}")
    pairs.append((parts[0], parts[1]))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
  return tok


def tokenizer_from_gguf(reader) -> Tokenizer:
  """The tokenizer stored in a ``gguf.GGUFReader``'s metadata (``tokenizer.ggml.*``).

  Control tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...) become
  special tokens.

  >>> import gguf  # doctest: +SKIP
  >>> tok = tokenizer_from_gguf(gguf.GGUFReader(smollm2_path()))  # doctest: +SKIP
  >>> tok.token_to_id("<|im_end|>")  # doctest: +SKIP
  2
  """
  return build_tokenizer(*tokenizer_fields(reader))


def tokenizer_fields(reader) -> tuple[list[str], list[str], list[str]]:
  """``(tokens, merges, special)`` of a ``gguf.GGUFReader``: ``build_tokenizer``'s arguments.

  Plain lists of strings, so the weights cache can keep them and a later run builds the
  tokenizer without parsing the GGUF again.

  >>> import gguf  # doctest: +SKIP
  >>> tokens, merges, special = tokenizer_fields(gguf.GGUFReader(smollm2_path()))  # doctest: +SKIP
  >>> len(tokens), special[:2]  # doctest: +SKIP
  (49152, ['<|endoftext|>', '<|im_start|>'])
  """
  model = reader.fields["tokenizer.ggml.model"].contents()
  if model != "gpt2":
    raise ValueError(f"tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {model!r}")
  tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
  merges = list(reader.fields["tokenizer.ggml.merges"].contents())
  types = reader.fields["tokenizer.ggml.token_type"].contents()
  special = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
  return tokens, merges, special


def chat_prompt(messages: Sequence[dict], add_generation_prompt: bool = True,
                default_system: str | None = DEFAULT_SYSTEM) -> str:
  """ChatML text of a conversation, as SmolLM2's chat template renders it.

  Args:
    messages: dicts with "role" ("system", "user", "assistant") and "content".
    add_generation_prompt: end with ``<|im_start|>assistant\\n`` for the reply.
    default_system: system turn put first when the first message is not one
      (None: none).

  >>> chat_prompt([{"role": "user", "content": "Hi"}], default_system=None)
  '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
  """
  parts = []
  if default_system is not None and (not messages or messages[0].get("role") != "system"):
    parts.append(f"{IM_START}system\n{default_system}{IM_END}\n")
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    parts.append(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n")
  if add_generation_prompt:
    parts.append(f"{IM_START}assistant\n")
  return "".join(parts)


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], **kwargs) -> list[int]:
  """Token ids of ``chat_prompt(messages, **kwargs)``.

  >>> encode_chat(tok, [{"role": "user", "content": "Hi"}])[:1]  # doctest: +SKIP
  [1]
  """
  return tokenizer.encode(chat_prompt(messages, **kwargs), add_special_tokens=False).ids
