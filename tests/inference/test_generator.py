"""CodeGenerator, the search index and the generate/search commands, on the tiny model with random
parameters and a byte-level tokenizer of the real tokenizer's interface."""
from __future__ import annotations

import collections
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code import generate
from flax_albert_code import search as search_cmd
from flax_albert_code import cli as cli_lib
from flax_albert_code import config as config_lib
from flax_albert_code.inference import memory
from flax_albert_code.inference import options as options_lib
from flax_albert_code.inference import model_decoding
from flax_albert_code.retrieval import index as search
from flax_albert_code.model import sharding
from flax_albert_code.model import albert as model_lib
from flax_albert_code.config import CLS_ID, EOS_ID, PAD_ID, SEP_ID
from flax_albert_code.inference.generator import CodeGenerator
from flax_albert_code.inference import postprocess
from flax_albert_code.inference.postprocess import parses
from flax_albert_code.tokenizer import frame_code, frame_description
from weights_util import random_variables

_SPECIAL = frozenset((PAD_ID, 2, CLS_ID, SEP_ID))


class ByteTokenizer:
  """Bytes as ids 6..261 (the tiny vocabulary has 512); the real tokenizer's interface."""

  vocab_size = 262

  def encode(self, text: str) -> list[int]:
    return [6 + b for b in text.encode("utf-8")]

  def decode(self, ids) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i not in _SPECIAL and i >= 6:
        out.append((i - 6) % 256)
    return out.decode("utf-8", "replace")

  def encode_description(self, text: str, max_len: int) -> list[int]:
    return frame_description(self.encode(text), max_len)

  def encode_code(self, text: str, max_len: int) -> list[int]:
    return frame_code(self.encode(text), max_len)


def _config():
  config = config_lib.get_config("tiny")
  config.model.initializer_range = 0.2
  config.data.max_desc_len = 24
  config.data.code_buckets = (16, 32)
  config.sample.max_new_tokens = 12
  config.sample.batch_buckets = (2, 4)
  return config


@pytest.fixture(scope="module")
def gen():
  config = _config()
  model = model_lib.build(config)[0]
  ids = jnp.ones((1, 8), jnp.int32)
  params = random_variables(model, ids, ids)["params"]
  return CodeGenerator(config, params, ByteTokenizer())


DESCS = ["add two numbers", "reverse a string", "read a file and count its lines"]


def test_candidates_and_rank_are_the_one_result_assembly_of_generator_and_export():
  """Rows cut to max_new_tokens, ordered by score on request, neighbours listed; rank drops
  unparsable candidates unless none parses, reranks stably by alignment and keeps the first."""
  tokens = np.array([[[5, 6, PAD_ID], [7, EOS_ID, PAD_ID], [8, 9, EOS_ID]]])
  decoded = {(5, 6): "x = (", (7, EOS_ID): "y = 1", (8, 9): "z = 2"}
  nbs = [[{"path": "a.py", "name": "f", "lineno": 3, "code": "...", "score": 1.5, "tokens": [1]}]]
  cands = postprocess.candidates(lambda seq: decoded[tuple(seq)], tokens,
                                 np.array([[-3.0, -1.0, -2.0]]), nbs, max_new_tokens=2,
                                 by_score=True)[0]
  assert [c["code"] for c in cands] == ["y = 1", "z = 2", "x = ("]
  assert [c["finish_reason"] for c in cands] == ["eos", "length", "length"]   # EOS cut off
  assert [c["parses"] for c in cands] == [True, True, False] and cands[0]["align"] is None
  assert cands[0]["neighbours"] == [{"path": "a.py", "name": "f", "lineno": 3, "score": 1.5}]
  vectors = {"d": [1.0, 0.0], "y = 1": [0.0, 1.0], "z = 2": [1.0, 0.0], "x = (": [1.0, 0.0]}

  def embed(texts, kind):
    del kind
    return np.array([vectors[t] for t in texts])
  kept = postprocess.rank([list(cands)], ["d"], embed, rerank=True, drop_unparsable=True,
                          keep=2)[0]
  assert [c["code"] for c in kept] == ["z = 2", "y = 1"] and kept[0]["align"] == 1.0
  bad = [dict(cands[2])]
  assert postprocess.rank([bad], ["d"], embed, rerank=False, drop_unparsable=True,
                          keep=1) == [bad]
  with pytest.raises(ValueError, match="trained without retrieval"):
    postprocess.retrieves(True, 0, "drop retrieve.")
  assert postprocess.retrieves(None, 2, "") and not postprocess.retrieves(None, 0, "")


def test_generate_returns_ranked_candidates(gen):
  out = gen.generate(DESCS[:2])
  assert len(out) == 2 and all(len(c) == 1 for c in out)
  cand = out[0][0]
  assert set(cand) == {"code", "score", "align", "parses", "finish_reason"}
  assert isinstance(cand["code"], str) and cand["score"] < 0 and cand["align"] is None
  assert cand["finish_reason"] in ("eos", "length")
  assert cand["parses"] == parses(cand["code"])
  beams = gen.generate(DESCS, strategy="beam", num_beams=2, num_samples=2)
  assert [len(c) for c in beams] == [2, 2, 2]
  for cands in beams:
    scores = [c["score"] for c in cands]
    assert scores == sorted(scores, reverse=True)
  assert gen.generate([]) == []


def test_second_call_with_new_descriptions_does_not_recompile(gen):
  gen.generate(["sort a list of numbers"], strategy="sample", num_samples=2, temperature=0.9,
               top_p=0.9, seed=1)
  before = model_decoding._generate._cache_size()  # pylint: disable=protected-access
  # Another description, seed, temperature and top_p: the same bucket and static options.
  again = gen.generate(["merge two dictionaries into one"], strategy="sample", num_samples=2,
                       temperature=0.7, top_p=0.8, seed=2)
  assert model_decoding._generate._cache_size() == before  # pylint: disable=protected-access
  assert len(again[0]) == 2


def test_batch_padding_and_chunks_do_not_change_outputs(gen):
  # 3 descriptions -> bucket 4 (one padding row); 5 -> 4 + 2 (the largest bucket, then a fit).
  alone = [gen.generate([d], strategy="beam", num_beams=2, num_samples=2)[0] for d in DESCS]
  together = gen.generate(DESCS + DESCS[:2], strategy="beam", num_beams=2, num_samples=2)
  for a, b in zip(alone + alone[:2], together):
    assert [c["code"] for c in a] == [c["code"] for c in b]
    np.testing.assert_allclose([c["score"] for c in a], [c["score"] for c in b], rtol=1e-5)


def test_a_seeded_description_samples_the_same_alone_and_batched(gen):
  """Sample j of description i is drawn with its own key (seed, i, j): the other descriptions
  of the call, and the batch bucket they make, do not change it."""
  kw = dict(strategy="sample", num_samples=2, top_p=0.9, seed=3, temperature=1.5)
  alone = gen.generate(DESCS[:1], **kw)[0]           # bucket 2
  batched = gen.generate(DESCS + DESCS[:1], **kw)[0]   # bucket 4
  assert [c["code"] for c in alone] == [c["code"] for c in batched]
  np.testing.assert_allclose([c["score"] for c in alone], [c["score"] for c in batched],
                             rtol=1e-5)
  other = gen.generate(DESCS[:1], **{**kw, "seed": 4})[0]
  assert [c["code"] for c in other] != [c["code"] for c in alone]


def test_a_cut_candidate_has_a_score_and_says_so(gen):
  out = gen.generate(DESCS, max_new_tokens=2, strategy="beam", num_beams=2, num_samples=2)
  cands = [c for cs in out for c in cs]
  assert all(isinstance(c["score"], float) for c in cands)
  assert {c["finish_reason"] for c in cands} <= {"eos", "length"}
  assert any(c["finish_reason"] == "length" for c in cands)


def test_rerank_orders_by_alignment_and_drops_unparsable(gen):
  kw = dict(strategy="sample", num_samples=2, top_p=0.9, seed=3)   # the program of the test above
  out = gen.generate(DESCS[:1], rerank=True, **kw)[0]
  aligns = [c["align"] for c in out]
  assert all(-1.0 - 1e-5 <= a <= 1.0 + 1e-5 for a in aligns)
  assert aligns == sorted(aligns, reverse=True)
  # The alignment is the cosine of the description and code vectors.
  d = gen.embed(DESCS[:1], kind="desc")[0]
  c = gen.embed([out[0]["code"]], kind="code")[0]
  np.testing.assert_allclose(out[0]["align"], d @ c, rtol=1e-5, atol=1e-6)
  kept = gen.generate(DESCS[:1], drop_unparsable=True, **kw)
  assert all(c["parses"] for c in kept[0]) or not any(c["parses"] for c in out)


def test_embed_matches_the_training_encoding(gen):
  codes = ["def f(a, b):\n  return a + b\n", "x = 1", "print('a line longer than the bucket')"]
  vecs = gen.embed(codes, kind="code")
  assert vecs.shape == (3, gen.cfg.align_dim)
  np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
  # The training forward pass encodes code_ids (tokens + EOS, padded to a bucket; a longer one
  # cut to it) and [CLS] description [SEP] padded to max_desc_len.
  tok, width = gen.tokenizer, gen.code_buckets[-1]
  code_ids = np.zeros((3, width), np.int32)
  desc_ids = np.zeros((3, gen.max_desc_len), np.int32)
  for i, (c, d) in enumerate(zip(codes, DESCS)):
    ids = tok.encode_code(c, width)
    code_ids[i, :len(ids)] = ids
    ids = tok.encode_description(d, gen.max_desc_len)
    desc_ids[i, :len(ids)] = ids
  out = gen.model.apply(gen.variables, jnp.asarray(desc_ids), jnp.asarray(code_ids))
  np.testing.assert_allclose(vecs, np.asarray(out["code"].vector_BxA), atol=2e-5)
  np.testing.assert_allclose(gen.embed(DESCS, kind="desc"), np.asarray(out["desc"].vector_BxA),
                             atol=2e-5)


@pytest.mark.parametrize("kwargs, words", [
    (dict(descriptions=["ok", "  "]), "Description 2 is empty"),
    (dict(descriptions="add"), "list of descriptions"),
    (dict(descriptions=[b"\xff\xfe"]), "not valid UTF-8"),
    (dict(strategy="nucleus"), "Unknown decoding strategy"),
    (dict(strategy="beam", num_beams=2, num_samples=3), "cannot return num_samples=3"),
    (dict(num_samples=2), "Greedy decoding gives one candidate"),
    (dict(strategy="sample", top_p=1.5), "top_p must be in"),
    (dict(strategy="sample", top_p=0.0), "top_p must be in"),
    (dict(strategy="sample", temperature=-1.0), "temperature must be positive"),
    (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
])
def test_bad_input_is_one_value_error_sentence(gen, kwargs, words):
  kwargs = {"descriptions": ["add two numbers"], **kwargs}
  with pytest.raises(ValueError, match=words) as info:
    gen.generate(**kwargs)
  assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_long_description_is_truncated_with_a_warning(gen, caplog):
  with caplog.at_level(logging.WARNING):
    out = gen.generate(["word " * 40])
  assert len(out) == 1
  assert "Description 1 is 200 tokens long" in caplog.text and "truncated" in caplog.text


def test_generation_on_a_mesh_equals_single_device(gen):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  config = _config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config.mesh)
  sharded = CodeGenerator(config, gen.variables, gen.tokenizer, mesh=mesh)
  assert sharded.batch_buckets == [4]
  ref = gen.generate(DESCS, strategy="greedy")
  out = sharded.generate(DESCS, strategy="greedy")
  assert [c[0]["code"] for c in out] == [c[0]["code"] for c in ref]
  np.testing.assert_allclose([c[0]["score"] for c in out], [c[0]["score"] for c in ref],
                             rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Search index and the command lines.


def _corpus():
  pairs = [("add two numbers", "def f(a, b):\n  return a + b"),
           ("reverse a string", "def g(s):\n  return s[::-1]"),
           ("count lines", "def h(p):\n  return len(open(p).readlines())")]
  return [{"name": f"f{i}", "path": f"m{i}.py", "lineno": i + 1, "description": d, "code": c}
          for i, (d, c) in enumerate(pairs)]


def test_search_index_is_built_once_and_reused(gen, tmp_path):
  examples = _corpus()
  index = search.load_or_build(gen, examples, "corpus-v1", str(tmp_path))
  assert not index.reused and index.vectors.shape == (3, gen.cfg.align_dim)
  again = search.load_or_build(gen, examples, "corpus-v1", str(tmp_path))
  assert again.reused and again.key == index.key
  np.testing.assert_array_equal(again.vectors, index.vectors)
  changed = search.load_or_build(gen, examples, "corpus-v2", str(tmp_path))
  assert not changed.reused and changed.key != index.key
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
  hits = search.query(gen, index, ["reverse a string"], top_k=2)[0]
  assert [h["rank"] for h in hits] == [1, 2] and hits[0]["score"] >= hits[1]["score"]
  # Scores are the cosine of the query's description vector and each code vector.
  expected = gen.embed(["reverse a string"]) @ index.vectors.T
  assert hits[0]["name"] == examples[int(np.argmax(expected))]["name"]


@pytest.fixture()
def cli(gen, monkeypatch):
  gen.checkpoint_path = "/nonexistent/run/checkpoints/5"
  monkeypatch.setattr(cli_lib, "load_generator", lambda path: gen)
  monkeypatch.setattr(cli_lib, "check_decoding",   # the fake checkpoint's config is gen's
                      lambda path, strategies, **decode: [
                          memory.check(gen.config, strategy=s, **decode) for s in strategies])
  return gen


def test_generate_command_prints_code_and_json(cli, capsys):
  assert generate.main(["--checkpoint", "x", "add two numbers"]) == 0
  assert capsys.readouterr().out.strip("\n") == cli.generate(["add two numbers"])[0][0][
      "code"].strip("\n")
  assert generate.main(["--checkpoint", "x", "--strategy", "beam", "--num-beams", "2",
                        "--num-samples", "2", "--json", "a", "b"]) == 0
  lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert [x["description"] for x in lines] == ["a", "b"]
  assert all(len(x["candidates"]) == 2 for x in lines)


@pytest.mark.parametrize("argv, words", [
    (["--strategy", "nucleus", "a"], "Unknown decoding strategy"),
    (["--top-p", "2", "--strategy", "sample", "a"], "--top-p must be in"),
    (["  "], "Description 1 is empty"),
])
def test_generate_command_bad_input_is_one_line_on_stderr(cli, capsys, argv, words):
  assert generate.main(["--checkpoint", "x", *argv]) == 1
  captured = capsys.readouterr()
  assert captured.out == "" and words in captured.err and len(captured.err.splitlines()) == 1
  assert "Traceback" not in captured.err


def test_generate_command_reads_a_file_and_rejects_bad_utf8(cli, capsys, tmp_path):
  good, bad = tmp_path / "d.txt", tmp_path / "bad.txt"
  good.write_text("add two numbers\n\nreverse a string\n")
  bad.write_bytes(b"ok\n\xff\n")
  assert generate.main(["--checkpoint", "x", "--input", str(good)]) == 0
  assert capsys.readouterr().out.count("# ") == 2
  assert generate.main(["--checkpoint", "x", "--input", str(bad)]) == 1
  assert "not valid UTF-8" in capsys.readouterr().err


def test_generate_command_missing_checkpoint(capsys, tmp_path):
  assert generate.main(["--checkpoint", str(tmp_path / "nope"), "add two numbers"]) == 1
  err = capsys.readouterr().err
  assert "does not exist" in err and len(err.splitlines()) == 1


def test_search_command(cli, capsys, tmp_path, monkeypatch):
  monkeypatch.setattr(search, "corpus", lambda spec, prepared, progress=False: (
      _corpus(), f"fake:{spec}", collections.Counter()))
  monkeypatch.setattr(search, "check_corpus", lambda spec: None)   # "fake" is no source kind
  argv = ["--checkpoint", "x", "--corpus", "fake", "--index-dir", str(tmp_path), "--top-k", "2"]
  assert search_cmd.main([*argv, "--json", "reverse a string"]) == 0
  out = capsys.readouterr()
  hit = json.loads(out.out)
  assert hit["query"] == "reverse a string" and len(hit["results"]) == 2
  assert "built" in out.err
  assert search_cmd.main([*argv, "reverse a string"]) == 0
  assert "reused" in capsys.readouterr().err
  assert search_cmd.main([*argv[:-2], "--top-k", "0", "q"]) == 1
  assert "--top-k must be at least 1" in capsys.readouterr().err


def test_search_indexes_every_function_and_counts_what_it_skipped(cli, capsys, tmp_path):
  repo = tmp_path / "repo"
  repo.mkdir()
  (repo / "a.py").write_text(
      'def documented(a, b):\n  """Add two numbers and return the sum."""\n  return a + b\n\n'
      "def undocumented(s):\n  return s[::-1]\n\n"
      "class C:\n  def method(self):\n    def inner():\n      return 1\n    return inner\n"
      'def only_doc():\n  """x"""\n')
  (repo / "broken.py").write_text("def f(:\n  pass\n")
  (repo / "latin.py").write_bytes(b"s = '\xe9'\n")
  argv = ["--checkpoint", "x", "--corpus", f"dir:{repo}", "--index-dir", str(tmp_path / "i"),
          "--top-k", "10", "--json", "reverse a string"]
  assert search_cmd.main(argv) == 0
  out = capsys.readouterr()
  names = {h["name"] for h in json.loads(out.out)["results"]}
  assert names == {"documented", "undocumented", "C.method", "C.method.inner", "only_doc"}
  assert "(5 functions, built; skipped: " in out.err
  assert "file: not UTF-8 (nor its declared encoding) 1" in out.err
  assert "file: syntax error 1" in out.err
  (repo / "a.py").unlink()
  assert search_cmd.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: The corpus dir:{repo} holds no functions to index (skipped: ")
  assert "file: syntax error 1" in err and len(err.splitlines()) == 1


def test_generate_command_missing_input_and_a_file_for_a_checkpoint(capsys, tmp_path):
  (tmp_path / "f.txt").write_text("x")
  for argv, words in ((["--checkpoint", str(tmp_path), "--input", str(tmp_path / "no.txt")],
                       f"error: Cannot read --input {tmp_path / 'no.txt'} (No such file"),
                      (["--checkpoint", str(tmp_path / "f.txt"), "add"],
                       f"error: Checkpoint path {tmp_path / 'f.txt'} is a file; pass a training")):
    assert generate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(words) and len(err.splitlines()) == 1, err


def test_a_missing_corpus_path_names_the_flag_before_the_model_loads(capsys, tmp_path,
                                                                     monkeypatch):
  from flax_albert_code import evaluate, export  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(cli_lib, "load_generator",
                      lambda path: pytest.fail("loaded the model before checking --corpus"))
  monkeypatch.setattr(CodeGenerator, "from_checkpoint",
                      lambda *a, **k: pytest.fail("loaded the model before checking --corpus"))
  missing = tmp_path / "nope"
  corpus = ["--checkpoint", str(tmp_path), "--corpus", f"dir:{missing}"]
  out = ["--out", str(tmp_path / "e")]
  for main, argv in ((generate.main, [*corpus, "q"]), (search_cmd.main, [*corpus, "q"]),
                     (evaluate.main, corpus), (export.main, [*corpus, *out])):
    assert main(argv) == 1
    assert capsys.readouterr().err == (f"error: Data source 'dir:{missing}': {missing} does not "
                                       "exist; fix the path in --corpus.\n"), main


def test_decoding_that_cannot_fit_is_refused_before_the_model_loads(tmp_path_factory, capsys,
                                                                    monkeypatch):
  """--num-samples 100000 ran out of memory (69 GB) after the model had loaded; now the flag is
  refused first, with the number that fits, and --max-new-tokens by the model's positions."""
  import re  # pylint: disable=import-outside-toplevel
  from export_util import shared_export  # pylint: disable=import-outside-toplevel
  from flax_albert_code import evaluate  # pylint: disable=import-outside-toplevel
  workdir = shared_export(tmp_path_factory)[0]
  monkeypatch.setattr(cli_lib, "load_generator", lambda path: pytest.fail("loaded the model"))
  monkeypatch.setattr(CodeGenerator, "from_checkpoint",
                      lambda *a, **k: pytest.fail("loaded the model"))
  huge = ["--strategy", "sample", "--num-samples", str(10 ** 9)]
  for main, argv in ((generate.main, [*huge, "add two numbers"]),
                     (evaluate.main, ["--strategies", "greedy,sample", *huge[2:]])):
    assert main(["--checkpoint", workdir, *argv]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: --num-samples {10 ** 9} needs at least [\d.]+ GB to decode, "
                        r"more than the [\d.]+ GB free here; ask for at most \d+\.\n", err), err
  assert generate.main(["--checkpoint", workdir, "--max-new-tokens", "1000", "add"]) == 1
  assert capsys.readouterr().err == ("error: --max-new-tokens must be at most 128 (the model's "
                                     "positions), got 1000.\n")


def test_the_memory_bound_says_how_many_candidates_fit():
  config = config_lib.get_config("tiny")
  row = memory.bytes_per_row(config, 100)
  assert row == 2 * config.model.decoder_layers * 100 * config.model.hidden_size * 4 + \
      8 * config.model.vocab_size
  assert memory.rows(config, 3, 5) == 8 * 5    # 3 descriptions: the bucket of 8, 5 beams each
  free = 8 * 7 * row                            # room for 7 candidates of 8 rows
  memory.check(config, num_texts=3, strategy="beam", num_beams=7, max_new_tokens=100, free=free)
  with pytest.raises(options_lib.OptionError, match="num_beams 8 needs at least .* at most 7"):
    memory.check(config, num_texts=3, strategy="beam", num_beams=8, max_new_tokens=100,
                 free=free)
  with pytest.raises(options_lib.OptionError, match="max_new_tokens 100 needs .* lower "
                                                    "max_new_tokens"):
    memory.check(config, num_texts=3, strategy="greedy", max_new_tokens=100, free=row)
