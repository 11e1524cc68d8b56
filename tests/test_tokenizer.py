"""Tokenizer: fixed special ids, byte-exact round trip for any string, framing helpers."""
import os

import hypothesis
import pytest
from hypothesis import strategies as st

from flax_albert_code import config as config_lib
from flax_albert_code import tokenizer as tokenizer_lib

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n\tdef bar(self):\n\t\tpass\n",
    "Return the sum of two numbers.",
    "for i in range(10):\n        print(i)  # comment\n",
] * 40

# Strings built from the characters that break naive tokenizers: U+2581 (sentencepiece's space),
# the escape character and its argument letters, lone surrogates, whitespace of every kind.
TRICKY = st.sampled_from(["\u2581", "\ue000", "_", "u", "d800", "\ud800", "\udfff", " ", "  ",
                          "\n", "\r\n", "\t", "\x00", "\x0c", "\u3000", "\ufeff", "é", "😀"])
ANY_TEXT = st.lists(st.one_of(st.characters(), TRICKY), max_size=40).map("".join)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.train_tokenizer(CORPUS, str(tmp_path_factory.mktemp("tok") / "spm.model"),
                                       vocab_size=300)


def test_special_ids_match_config(tok):
  sp = tok.sp
  assert [sp.id_to_piece(i) for i in range(8)] == [
      "<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "\n", "\t"]
  assert (config_lib.PAD_ID, config_lib.UNK_ID, config_lib.BOS_ID, config_lib.EOS_ID,
          config_lib.CLS_ID, config_lib.SEP_ID) == (0, 1, 2, 3, 4, 5)
  assert 280 <= tok.vocab_size <= 300
  assert tok.encode("\n\t") == [6, 7]


@hypothesis.given(ANY_TEXT)
def test_escape_is_invertible(text):
  assert tokenizer_lib.unescape(tokenizer_lib.escape(text)) == text
  assert "\u2581" not in tokenizer_lib.escape(text)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(ANY_TEXT)
def test_round_trip_any_text(tok, text):
  ids = tok.encode(text)
  assert all(6 <= i < tok.vocab_size for i in ids)  # no specials, no UNK (byte fallback)
  assert tok.decode(ids) == text


def test_round_trip_code_with_u2581_and_whitespace(tok):
  code = "def f(x):\r\n\t  s = '\u2581\u2581 \ue000_'  \n\n\x0c    return   s\n"
  assert tok.decode(tok.encode(code)) == code


def test_decode_stops_at_eos_and_skips_specials(tok):
  hi = tok.encode("hi")
  ids = [config_lib.CLS_ID, config_lib.BOS_ID, *hi, config_lib.SEP_ID, config_lib.PAD_ID,
         config_lib.EOS_ID, *tok.encode("after")]
  assert tok.decode(ids) == "hi"


def test_framing(tok):
  desc = tok.encode("Return the sum of two numbers.")
  assert tok.encode_description("Return the sum of two numbers.", 100) == [4, *desc, 5]
  cut = tok.encode_description("Return the sum of two numbers.", 4)
  assert cut == [4, *desc[:2], 5]
  code = tok.encode("def add(a, b):\n")
  assert tok.encode_code("def add(a, b):\n", 100) == [*code, 3]
  assert tok.encode_code("def add(a, b):\n", 3) == code[:3]  # truncated: no EOS
  assert tok.encode_code("def add(a, b):\n", len(code)) == code
  assert tok.encode_code("def add(a, b):\n", len(code) + 1) == [*code, 3]


def test_load_and_atomic_write(tok, tmp_path):
  again = tokenizer_lib.Tokenizer.load(tok.path)
  assert again.encode("def x(): pass") == tok.encode("def x(): pass")
  assert os.listdir(os.path.dirname(tok.path)) == ["spm.model"]  # no temp file left behind
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="cannot be read"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / "junk.model"))
  with pytest.raises(tokenizer_lib.TokenizerError, match="No text"):
    tokenizer_lib.train_tokenizer([], str(tmp_path / "x.model"), 300)
  assert not (tmp_path / "x.model").exists()


def test_training_is_deterministic(tok, tmp_path):
  again = tokenizer_lib.train_tokenizer(CORPUS, str(tmp_path / "again.model"), vocab_size=300)
  assert open(again.path, "rb").read() == open(tok.path, "rb").read()


def test_bpe_tokenizer_round_trips_and_keys_its_own_prepared_data(tmp_path):
  """config.data.tokenizer_type="bpe": the same exact round trip; data prepared with it gets its
  own key, and the default "unigram" keeps the key data had before the field."""
  from flax_albert_code.data import prepared   # pylint: disable=import-outside-toplevel
  texts = ["def add(a, b):\n    return a + b\n", "class A:\n\tx = 'J|\u2581'\n"] * 50
  tok = tokenizer_lib.train_tokenizer(texts, str(tmp_path / "bpe.model"), 300, model_type="bpe")
  for t in texts[:2] + ["    self.__init__()  # ok\n"]:
    assert tok.decode(tok.encode(t)) == t
  with pytest.raises(tokenizer_lib.TokenizerError, match="'unigram' or 'bpe'"):
    tokenizer_lib.train_tokenizer(texts, str(tmp_path / "x.model"), 300, model_type="wordpiece")
  d = config_lib.get_config("tiny").data
  assert "tokenizer_type" not in prepared.options(d)
  d.tokenizer_type = "bpe"
  assert prepared.options(d)["tokenizer_type"] == "bpe"
