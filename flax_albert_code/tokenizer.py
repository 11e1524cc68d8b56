"""Sentencepiece tokenizer that round-trips code byte for byte: `decode(encode(x)) == x`.

Ids fixed for the whole library (config_lib): PAD=0, UNK=1, BOS=2, EOS=3, CLS=4, SEP=5, then the
user-defined pieces "\\n" and "\\t". Sentencepiece writes spaces as U+2581, so a literal U+2581
(and a lone surrogate, which UTF-8 cannot hold) is escaped first; see `escape`/`unescape`.
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Iterable, Sequence

import sentencepiece as spm

from flax_albert_code.config import BOS_ID, CLS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID
from flax_albert_code.utils import files

USER_SYMBOLS = ("\n", "\t")
CONTROL_SYMBOLS = ("[CLS]", "[SEP]")  # get ids 4 and 5
_ESC = "\ue000"  # private use: ESC ESC -> ESC, ESC "_" -> U+2581, ESC "u" + 4 hex -> a surrogate
_NEEDS_ESCAPE = re.compile("[\ue000\u2581\ud800-\udfff]")
_ESCAPES = {_ESC: _ESC + _ESC, "\u2581": _ESC + "_"}   # and a surrogate: ESC "u" + 4 hex
_ESCAPED = re.compile("\ue000(?:(\ue000)|(_)|u([0-9a-f]{4}))")
_SKIP_ON_DECODE = frozenset((PAD_ID, BOS_ID, CLS_ID, SEP_ID))


class TokenizerError(ValueError):
  """A tokenizer file is missing or cannot be trained/loaded; the message says what to do."""


def _unescape_match(m: re.Match) -> str:
  return _ESC if m[1] else "\u2581" if m[2] else chr(int(m[3], 16))


def escape(text: str) -> str:
  """Makes `text` safe for sentencepiece; `unescape(escape(x)) == x` for every str."""
  if not _NEEDS_ESCAPE.search(text):
    return text
  return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES.get(m[0]) or f"{_ESC}u{ord(m[0]):04x}", text)


def unescape(text: str) -> str:
  """Inverse of `escape`; a stray escape character (from a model's output) is kept as is."""
  return _ESCAPED.sub(_unescape_match, text) if _ESC in text else text


class Tokenizer:
  """A loaded sentencepiece model with the library's special ids."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str):
    self.sp = processor
    self.path = path
    for token_id, piece in ((PAD_ID, "<pad>"), (UNK_ID, "<unk>"), (BOS_ID, "<s>"),
                            (EOS_ID, "</s>"), (CLS_ID, "[CLS]"), (SEP_ID, "[SEP]")):
      if processor.id_to_piece(token_id) != piece:
        raise TokenizerError(
            f"{path}: id {token_id} is {processor.id_to_piece(token_id)!r}, expected {piece!r}; "
            "this model was not trained by flax_albert_code.tokenizer.train_tokenizer, retrain it.")

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise TokenizerError(f"Tokenizer model {path} does not exist; train one with `python -m "
                           "flax_albert_code.prepare` or fix config.data.tokenizer_path.")
    processor = spm.SentencePieceProcessor()
    try:
      processor.Load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerError(f"Tokenizer model {path} cannot be read ({e}); delete it and rerun "
                           "prepare to train a new one.") from None
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(escape(text))

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    return self.sp.encode([escape(t) for t in texts], num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS; PAD, BOS, CLS and SEP are skipped."""
    ids = itertools.takewhile(lambda i: i != EOS_ID, map(int, ids))
    return unescape(self.sp.decode([i for i in ids if i not in _SKIP_ON_DECODE]))

  def encode_description(self, text: str, max_len: int) -> list[int]:
    """[CLS] tokens [SEP]; a long description loses its tail tokens, never CLS or SEP."""
    return frame_description(self.encode(text), max_len)

  def encode_code(self, text: str, max_len: int) -> list[int]:
    """Code tokens + [EOS]; truncated code keeps its first `max_len` tokens and gets no EOS."""
    return frame_code(self.encode(text), max_len)


def frame_description(tokens: Sequence[int], max_len: int) -> list[int]:
  return [CLS_ID, *tokens[:max(max_len - 2, 0)], SEP_ID]


def frame_context(desc_tokens: Sequence[int], neighbours: Sequence[Sequence[int]],
                  max_desc_len: int, max_len: int) -> list[int]:
  """[CLS] description [SEP] code_1 [SEP] ... code_k [SEP], at most `max_len` ids; the nearest
  neighbour may fill the room but for 1 / (2k) of it kept for each later one (so the code most
  worth copying is whole as often as it can be), which share what is left."""
  out = frame_description(desc_tokens, min(max_desc_len, max_len))
  n = len(neighbours)
  kept = (max_len - len(out)) // (2 * n) if n else 0   # room each later neighbour keeps
  for i, code in enumerate(neighbours):
    room = max_len - len(out)
    share = (room - (n - i - 1) * kept if i == 0 else room // (n - i)) - 1
    if share <= 0:
      break
    out += [*code[:share], SEP_ID]
  return out


def frame_code(tokens: Sequence[int], max_len: int) -> list[int]:
  if len(tokens) >= max_len:
    return list(tokens[:max_len])
  return [*tokens, EOS_ID]


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int, *,
                    num_threads: int = 8, input_sentence_size: int = 0,
                    model_type: str = "unigram") -> Tokenizer:
  """Trains a sentencepiece model ("unigram" or "bpe") on `texts`, written atomically; its
  vocabulary may be smaller than `vocab_size`. The thread count is fixed, not the CPU count:
  hosts of any size get the same tokenizer."""
  out_path = os.fspath(out_path)
  if model_type not in ("unigram", "bpe"):
    raise TokenizerError(f"Unknown tokenizer type {model_type!r}; use 'unigram' or 'bpe' "
                         "(config.data.tokenizer_type).")
  texts = [escape(t) for t in texts if t]
  if not texts:
    raise TokenizerError(f"No text to train the tokenizer {out_path} on; check the data sources.")
  try:
    with files.atomic_write(out_path, "wb") as f:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(texts), model_writer=f, vocab_size=vocab_size,
          model_type=model_type, normalization_rule_name="identity",
          remove_extra_whitespaces=False, add_dummy_prefix=False, split_by_whitespace=True,
          allow_whitespace_only_pieces=True, byte_fallback=True,
          user_defined_symbols=list(USER_SYMBOLS), control_symbols=list(CONTROL_SYMBOLS),
          pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
          max_sentence_length=1 << 20, hard_vocab_limit=False,
          input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
          num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise TokenizerError(f"Training the tokenizer {out_path} with vocab_size={vocab_size} "
                         f"failed ({str(e).strip()}); raise config.data.tokenizer_vocab_size "
                         "(the 256 byte pieces, 8 special ones and one per distinct character "
                         "come first).") from None
  return Tokenizer.load(out_path)
