"""Retrieval-augmented generation: the retriever, leakage, the decoder reading its neighbours,
and the user-facing paths (CodeGenerator, the generate command, bad stores)."""
import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code import export as export_cmd
from flax_albert_code import generate as generate_cli
from flax_albert_code.config import CLS_ID, EOS_ID, SEP_ID
from flax_albert_code.retrieval import neighbours as neighbours_lib
from flax_albert_code.data.sources import DataError
from flax_albert_code.deploy import runtime
from flax_albert_code.deploy import writer
from flax_albert_code.evaluation import design_example
from flax_albert_code.inference import model_decoding
from flax_albert_code.retrieval import retriever as retriever_lib
from flax_albert_code.inference.generator import CodeGenerator
from flax_albert_code.model import albert as model_lib
from flax_albert_code.training import loop as trainer
from flax_albert_code.training import step as train_step
from flax_albert_code.tokenizer import frame_context

from test_train import MESH_1, make_config, run

RAG = {"retrieval.k": 2, "retrieval.max_ctx_len": 96, "retrieval.method": "hybrid",
       "retrieval.refresh_steps": (3,), "train.steps": 4, "train.eval_every": 2,
       "train.checkpoint_every": 4}


def test_retriever_methods_rank_and_exclude_the_querys_own_file():
  codes = ["def read_file(path): return open(path).read()",
           "def add(a, b): return a + b",
           "def read_lines(path): return open(path).readlines()"]
  vectors = np.eye(3, dtype=np.float32)
  r = retriever_lib.Retriever(codes, vectors, groups=["a.py", "b.py", "c.py"])
  idx, _ = r.search(["read file path"], 3, method="bm25")
  assert idx[0, 0] in (0, 2) and idx[0, 2] == 1
  idx, scores = r.search(["q"], 2, method="dense", query_vectors_QxA=np.array([[0, 1, 0]], "f"))
  assert idx[0, 0] == 1 and scores[0, 0] == pytest.approx(1.0)
  # The query's own file never comes back; fewer than k left -> -1.
  idx, _ = r.search(["read file path"], 3, method="hybrid", query_vectors_QxA=vectors[:1],
                    exclude=["a.py"])
  assert 0 not in idx[0, :2] and idx[0, 2] == -1
  with pytest.raises(ValueError, match="needs the model's vectors"):
    retriever_lib.Retriever(codes).search(["x"], 1, method="dense")
  with pytest.raises(ValueError, match="Unknown retrieval method"):
    r.search(["x"], 1, method="colbert")


def test_neighbour_lines_are_what_generate_train_and_the_design_example_print():
  nbs = [{"path": "stdlib/codecs.py", "lineno": 609, "name": "StreamReader.readlines",
          "score": 6.857}]
  line = "# neighbour 1: stdlib/codecs.py:609 StreamReader.readlines (score 6.86)"   # README
  assert retriever_lib.neighbour_lines(nbs) == [line]
  assert retriever_lib.neighbour_lines([]) == []
  text = design_example.format_results([{"strategy": "greedy", "code": "x = 1\n",
                                         "neighbours": nbs, "passed": True, "status": "ok"}])
  assert text.splitlines()[2:] == [line, "x = 1"]


def test_frame_context_shares_the_room_between_neighbours():
  ids = frame_context([10, 11], [[20] * 50, [30] * 3], max_desc_len=8, max_len=24)
  assert ids[:4] == [CLS_ID, 10, 11, SEP_ID] and len(ids) <= 24
  assert ids.count(SEP_ID) == 3 and ids[-4:] == [30, 30, 30, SEP_ID]
  # The nearest neighbour may take all but a quarter of the room (k = 2), the next the rest.
  assert ids.count(20) == 20 - 5 - 1
  ids = frame_context([10, 11], [[20] * 50, [30] * 50, [40] * 50], max_desc_len=8, max_len=64)
  assert (ids.count(20), ids.count(30), ids.count(40)) == (60 - 2 * 10 - 1, 9, 9)
  assert len(ids) == 64
  assert frame_context([10, 11], [], 8, 24) == [CLS_ID, 10, 11, SEP_ID]
  # A context shorter than the descriptions' limit cuts the description to fit it.
  assert len(frame_context(list(range(10, 40)), [[20] * 5], max_desc_len=32, max_len=8)) <= 8


def test_training_that_mines_with_its_encoder_refuses_to_start_without_an_embedder(tmp_path):
  """Training imports no inference: the model's encoder for re-mining neighbours comes from the
  caller (the train command passes cli.embedder); without one a run says so before any work."""
  config = make_config(tmp_path / "data", MESH_1, **RAG)
  with pytest.raises(trainer.TrainingError, match="no embedder was given"):
    trainer.Trainer(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory):
  """A tiny retrieval model trained 4 steps (neighbours mined by BM25, refreshed at step 3 by
  its own encoder), and its workdir."""
  root = tmp_path_factory.mktemp("rag")
  config = make_config(root / "data", MESH_1, **RAG)
  result, _ = run(config, root / "w")
  return config, result, root / "w"


def test_training_neighbours_never_come_from_the_examples_own_file(rag_run):
  config, result, workdir = rag_run
  saved = sorted(os.listdir(workdir / "retrieval"))
  assert saved == ["neighbours_00000000.npz", "neighbours_00000003.npz"]
  train_paths = neighbours_lib.texts(result.prepared, "train")[2]
  for step, method in ((0, "bm25"), (3, "hybrid")):
    nb = neighbours_lib.load(str(workdir), step, result.prepared, 2)
    assert nb.method == method and nb.step == step
    for split, ids in nb.ids.items():
      paths = neighbours_lib.texts(result.prepared, split)[2]
      assert (ids >= 0).all()
      assert all(paths[i] != train_paths[j] for i, row in enumerate(ids) for j in row), split
  assert result.history[-1]["step"] == 4 and np.isfinite(result.history[-1]["loss"])


def test_a_retrieval_run_logs_the_gauge_at_each_validation(rag_run):
  config, result, workdir = rag_run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  gauged = [r for r in rows if "input_gap" in r]
  assert [r["step"] for r in gauged] == [2, 4]
  for r in gauged:
    for k in ("input_gap", "copy_gap", "encoder_spread"):
      assert np.isfinite(r[k]), (k, r)
    assert 0 < r["encoder_spread"] <= 2
  assert {"input_gap", "copy_gap", "encoder_spread"} <= set(result.valid)


def test_resume_after_a_refresh_reads_the_refreshed_neighbours(rag_run, tmp_path):
  config, full, _ = rag_run
  cut, _ = run(config, tmp_path / "w", max_steps=3)
  # The first call saved no checkpoint at step 3 (max_steps); save-and-resume at 4 is covered by
  # the trainer's tests. Here: load() picks the newest file not after the step.
  assert neighbours_lib.load(str(tmp_path / "w"), 2, cut.prepared, 2).step == 0
  assert neighbours_lib.load(str(tmp_path / "w"), 3, cut.prepared, 2).step == 3


def test_damaged_or_mismatched_neighbours_are_one_clear_error(rag_run, tmp_path):
  _, result, workdir = rag_run
  nb = neighbours_lib.load(str(workdir), 0, result.prepared, 2)
  neighbours_lib.save(str(tmp_path), nb)
  path = tmp_path / "retrieval" / "neighbours_00000000.npz"
  with pytest.raises(DataError, match="k=3.*delete .*neighbours_00000000.npz"):
    neighbours_lib.load(str(tmp_path), 0, result.prepared, 3)
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(DataError, match="damaged.*delete"):
    neighbours_lib.load(str(tmp_path), 0, result.prepared, 2)


def test_generator_retrieves_by_default_and_lists_neighbours(rag_run):
  _, _, workdir = rag_run
  gen = CodeGenerator.from_checkpoint(str(workdir))
  texts = ["Return the sum of two numbers.", "Read a file and return its lines."]
  out = gen.generate(texts, max_new_tokens=8)
  for cands in out:
    nbs = cands[0]["neighbours"]
    assert len(nbs) == 2 and nbs[0]["score"] >= nbs[1]["score"]
    assert set(nbs[0]) == {"path", "name", "lineno", "score"}
  # --no-retrieve: exactly the model fed the framed description alone.
  plain = gen.generate(texts, max_new_tokens=8, retrieve=False)
  assert "neighbours" not in plain[0][0]
  ids = np.array([gen._description_ids(t, i) + [0] * (gen.max_desc_len - len(
      gen._description_ids(t, i))) for i, t in enumerate(texts)], np.int32)
  tokens, _ = model_decoding.generate(gen.model, gen.variables, jnp.asarray(ids), max_new_tokens=8,
                                decode_phase=gen.decode_phase)
  assert [gen.tokenizer.decode(np.asarray(t[0]).tolist()) for t in tokens] == [
      c[0]["code"] for c in plain]
  # Another corpus: neighbours come from it.
  corpus = workdir.parent / "mine"
  corpus.mkdir()
  (corpus / "util.py").write_text('def plus(a, b):\n    """Add two numbers."""\n'
                                  '    return a + b\n')
  out = gen.generate(texts[:1], max_new_tokens=8, corpus=f"dir:{corpus}")
  assert out[0][0]["neighbours"][0]["name"] == "plus"


def test_generate_command_prints_and_serialises_neighbours(rag_run, capsys):
  _, _, workdir = rag_run
  assert generate_cli.main(["--checkpoint", str(workdir), "--max-new-tokens", "8",
                            "add two numbers"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("# neighbour 1: ") and lines[1].startswith("# neighbour 2: ")
  assert generate_cli.main(["--checkpoint", str(workdir), "--max-new-tokens", "8", "--json",
                            "add two numbers"]) == 0
  cand = json.loads(capsys.readouterr().out)["candidates"][0]
  assert len(cand["neighbours"]) == 2 and cand["finish_reason"] in ("eos", "length")
  assert generate_cli.main(["--checkpoint", str(workdir), "--max-new-tokens", "8",
                            "--no-retrieve", "add two numbers"]) == 0
  assert "# neighbour" not in capsys.readouterr().out


def test_plain_model_refuses_retrieval_and_empty_corpus_is_an_error(rag_run, tmp_path):
  config, result, workdir = rag_run
  plain_cfg = make_config(config.data.data_dir, MESH_1)
  gen = CodeGenerator(plain_cfg, jax.device_get(result.state.params["model"]),
                      result.prepared.tokenizer, prepared=result.prepared)
  with pytest.raises(ValueError, match="trained without retrieval"):
    gen.generate(["add"], retrieve=True)
  rag = CodeGenerator.from_checkpoint(str(workdir))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no functions.*--no-retrieve"):
    rag.generate(["add"], corpus=f"dir:{tmp_path / 'empty'}")


def _copy_task(copy_head: bool, steps: int) -> tuple[float, float]:
  """Descriptions carry no information (random tokens); the answer is only in the neighbour,
  which is the target itself. Returns the share of held-out target tokens greedy decoding
  gets right with the neighbour and without it, after `steps` steps."""
  config = config_lib.get_config("tiny")
  config.model.update(hidden_size=64, intermediate_size=128, embedding_size=32,
                      num_attention_heads=2, vocab_size=40, max_position_embeddings=64,
                      copy_head=copy_head)
  config.retrieval.k = 1
  config.retrieval.max_ctx_len = 24
  config.data.max_desc_len = 8
  config.train.align_losses = ""
  model, _ = model_lib.build(config)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adam(optax.linear_schedule(0.0, 2e-3, 100)))
  rng = np.random.default_rng(0)

  def batch(n, with_neighbour=True):
    code = rng.integers(6, 40, (n, 7)).astype(np.int32)
    code = np.concatenate([code, np.full((n, 1), EOS_ID, np.int32)], 1)
    desc = np.concatenate([np.full((n, 1), CLS_ID), rng.integers(6, 40, (n, 4)),
                           np.full((n, 1), SEP_ID), np.zeros((n, 2))], 1).astype(np.int32)
    ctx = np.zeros((n, 24), np.int32)
    for i in range(n):
      row = frame_context(desc[i, 1:5].tolist(), [code[i, :7].tolist()] if with_neighbour else [],
                          8, 24)
      ctx[i, :len(row)] = row
    return {"desc_ids": desc, "code_ids": code, "ctx_ids": ctx}

  params = nn.unbox(model.init(jax.random.PRNGKey(0), batch(2)["desc_ids"],
                               batch(2)["code_ids"]))
  state = {"model": params["params"], "log_inv_temp": jnp.zeros(())}
  opt = tx.init(state)
  loss_fn = functools.partial(train_step.compute_losses, model=model, config=config, train=True)

  @jax.jit
  def step(state, opt, b):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state, b, jax.random.PRNGKey(0))
    updates, opt = tx.update(g, opt, state)
    return optax.apply_updates(state, updates), opt, m

  for _ in range(steps):
    state, opt, _ = step(state, opt, batch(32))
  test = batch(16)
  variables = {"params": state["model"]}

  def accuracy(ctx):
    tokens, _ = model_decoding.generate(model, variables, jnp.asarray(ctx), max_new_tokens=8)
    return float((np.asarray(tokens)[:, 0, :7] == test["code_ids"][:, :7]).mean())
  return accuracy(test["ctx_ids"]), accuracy(batch(16, with_neighbour=False)["ctx_ids"])


def test_the_copy_head_learns_to_copy_the_answer_from_its_neighbour_at_once():
  # Measured: the copy head copies 100% of held-out target tokens from step 50 on; the plain
  # decoder 4% at step 150 and 71% after 1000 steps (its cross-attention has to discover the
  # induction pattern). Without the neighbour neither can (chance is 3%).
  copied, alone = _copy_task(copy_head=True, steps=150)
  assert copied > 0.95 and alone < 0.2, (copied, alone)
  plain, _ = _copy_task(copy_head=False, steps=150)
  assert plain < 0.3, plain


# ---------------------------------------------------------------------------------------------
# Exports and the server: the same neighbours and the same code as CodeGenerator.

EXPORT_OPTS = dict(buckets=[1, 4], lengths=[8], strategies=["greedy"], platforms=["cpu"],
                   hf_encoder=False)
TEXTS = ["Return the sum of two numbers.", "Read a file and return its lines.",
         "Sort a list of numbers."]


@pytest.fixture(scope="module")
def rag_export(rag_run):
  """The retrieval run's export (float32, greedy, its train split shipped as the index)."""
  _, _, workdir = rag_run
  out = str(workdir.parent / "export")
  writer.export(str(workdir), out, **EXPORT_OPTS)
  return out, runtime.load_export(out), CodeGenerator.from_checkpoint(str(workdir))


def test_export_of_a_retrieval_model_ships_its_corpus_and_context_programs(rag_run, rag_export):
  config, result, _ = rag_run
  out, exp, _ = rag_export
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["format"] == runtime.FORMAT == 2
  rag = manifest["inference"]["retrieval"]
  assert rag == {"k": 2, "method": "hybrid", "max_desc_len": 32, "max_ctx_len": 96,
                 "index": "retrieval_index", "corpus": "prepared:train"}
  names = {p["name"]: p["width"] for p in manifest["programs"] if p["kind"] == "generate"}
  assert names == {"generate_greedy_b1_t8": 32, "generate_greedy_b4_t8": 32,
                   "generate_greedy_b1_t8_w96": 96, "generate_greedy_b4_t8_w96": 96}
  assert {f"retrieval_index/{n}" for n in ("vectors.npy", "items.json", "index.json")} <= set(
      manifest["files"])
  train = [e["name"] for e in result.prepared.source("train")]
  assert [it["name"] for it in exp.index.items] == train and exp.retrieval_k == 2


def test_export_retrieves_and_generates_as_the_checkpoint(rag_export):
  """float32 greedy: the same neighbours (scores to float32 rounding: the query vectors come
  from the export's encode program) and the same code; retrieve=False is the description-only
  input, which gives other scores."""
  _, exp, gen = rag_export
  ours, ref = exp.generate(TEXTS, max_new_tokens=8), gen.generate(TEXTS, max_new_tokens=8)
  for a, b in zip(ours, ref):
    assert a[0]["code"] == b[0]["code"] and a[0]["finish_reason"] == b[0]["finish_reason"]
    np.testing.assert_allclose(a[0]["score"], b[0]["score"], rtol=1e-5)
    assert len(a[0]["neighbours"]) == 2
    assert [{k: n[k] for k in ("path", "name", "lineno")} for n in a[0]["neighbours"]] == [
        {k: n[k] for k in ("path", "name", "lineno")} for n in b[0]["neighbours"]]
    np.testing.assert_allclose([n["score"] for n in a[0]["neighbours"]],
                               [n["score"] for n in b[0]["neighbours"]], rtol=1e-4, atol=1e-5)
  plain, plain_ref = (x.generate(TEXTS, max_new_tokens=8, retrieve=False) for x in (exp, gen))
  assert [c[0]["code"] for c in plain] == [c[0]["code"] for c in plain_ref]
  assert all("neighbours" not in c[0] for c in plain)
  tokens, scores = exp.generate_tokens(TEXTS, max_new_tokens=8)     # description-width input
  assert [exp.tokenizer.decode(t[0].tolist()) for t in tokens] == [c[0]["code"] for c in plain]
  np.testing.assert_array_equal(scores[:, 0], [c[0]["score"] for c in plain])
  assert [c[0]["score"] for c in plain] != [c[0]["score"] for c in ours]


def test_server_lists_each_candidates_neighbours(rag_export):
  from fastapi.testclient import TestClient  # pylint: disable=import-outside-toplevel
  from flax_albert_code.deploy import server  # pylint: disable=import-outside-toplevel
  _, exp, _ = rag_export
  want = exp.generate(TEXTS[:2], max_new_tokens=8)
  with TestClient(server.create_app(exp)) as client:
    r = client.post("/v1/generate", json={"descriptions": TEXTS[:2], "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    got = [res["candidates"][0] for res in r.json()["results"]]
    assert [c["code"] for c in got] == [c[0]["code"] for c in want]
    assert [c["neighbours"] for c in got] == [c[0]["neighbours"] for c in want]
    r = client.post("/v1/generate", json={"descriptions": TEXTS[0], "max_new_tokens": 8,
                                          "retrieve": False})
    assert r.status_code == 200 and "neighbours" not in r.json()["results"][0]["candidates"][0]
    assert client.get("/healthz").json()["retrieves"] is True


def test_export_without_its_index_needs_one_or_retrieve_false(rag_run, rag_export, tmp_path,
                                                              capsys):
  _, _, workdir = rag_run
  out, exp, _ = rag_export
  bare = str(tmp_path / "bare")
  assert export_cmd.main(["--checkpoint", str(workdir), "--out", bare, "--buckets", "1",
                          "--lengths", "8", "--strategies", "greedy", "--platforms", "cpu",
                          "--no-hf-encoder", "--no-retrieval-index"]) == 0
  assert capsys.readouterr().out.rstrip().endswith("no retrieval index")
  alone = runtime.load_export(bare)
  assert alone.index is None and not os.path.exists(os.path.join(bare, "retrieval_index"))
  with pytest.raises(ValueError, match="has no index.*index=.*retrieve=False"):
    alone.generate(TEXTS[:1], max_new_tokens=8)
  assert alone.generate(TEXTS[:1], max_new_tokens=8, retrieve=False)[0][0]["code"] == \
      exp.generate(TEXTS[:1], max_new_tokens=8, retrieve=False)[0][0]["code"]
  served = runtime.load_export(bare, index=os.path.join(out, "retrieval_index"))
  assert served.generate(TEXTS[:1], max_new_tokens=8)[0][0]["neighbours"] == \
      exp.generate(TEXTS[:1], max_new_tokens=8)[0][0]["neighbours"]


def _index_copy(src, dst, *, meta=True, vectors=None):
  dst.mkdir()
  for name in ("vectors.npy", "items.json") + (("index.json",) if meta else ()):
    shutil.copyfile(os.path.join(src, name), dst / name)
  if vectors is not None:
    np.save(dst / "vectors.npy", vectors)
  return str(dst)


def test_a_damaged_or_foreign_index_is_one_clear_error(rag_export, tmp_path):
  out, exp, _ = rag_export
  shipped = os.path.join(out, "retrieval_index")
  vectors = np.load(os.path.join(shipped, "vectors.npy"))
  # The shipped index is checksummed with the export.
  damaged = str(tmp_path / "damaged")
  shutil.copytree(out, damaged)
  with open(os.path.join(damaged, "retrieval_index", "items.json"), "r+b") as f:
    f.truncate(50)
  with pytest.raises(runtime.ExportError, match="retrieval_index/items.json is 50 bytes"):
    runtime.load_export(damaged)
  with pytest.raises(runtime.ExportError, match="cannot be read.*export again"):
    runtime.load_export(damaged, verify=False)
  # A served index: unreadable, another model's (recorded fingerprint or not), another width.
  bad = _index_copy(shipped, tmp_path / "truncated")
  with open(os.path.join(bad, "vectors.npy"), "r+b") as f:
    f.truncate(60)
  foreign = _index_copy(shipped, tmp_path / "foreign")
  with open(os.path.join(foreign, "index.json"), "w") as f:
    json.dump({"params_fingerprint": "0" * 64}, f)
  rng = np.random.default_rng(0)
  other = rng.normal(size=vectors.shape).astype(np.float32)
  other /= np.linalg.norm(other, axis=1, keepdims=True)
  unrecorded = _index_copy(shipped, tmp_path / "unrecorded", meta=False, vectors=other)
  narrow = _index_copy(shipped, tmp_path / "narrow", meta=False, vectors=vectors[:, :3])
  for path, words in ((bad, "cannot be read"), (foreign, "built by another model"),
                      (unrecorded, "not this model's encoding"), (narrow, "-dimensional")):
    with pytest.raises(runtime.ExportError, match=words) as info:
      runtime.load_export(out, index=path)
    message = str(info.value)
    assert path in message and "rebuild it with this model" in message, message
    assert len(message.splitlines()) == 1
  # The same vectors without index.json pass the re-encoding check.
  fine = _index_copy(shipped, tmp_path / "fine", meta=False)
  assert len(runtime.load_export(out, index=fine).index.items) == len(vectors)


def test_exported_programs_ban_the_checkpoints_repeated_ngrams(rag_run, tmp_path):
  """An export is built with its checkpoint's config.sample.no_repeat_ngram_size (recorded in
  the manifest) and decodes as the checkpoint does with it."""
  _, _, workdir = rag_run
  gen = CodeGenerator.from_checkpoint(str(workdir))
  with gen.config.unlocked():
    gen.config.sample.no_repeat_ngram_size = 2
  out = str(tmp_path / "export")
  writer.export_generator(gen, out, **EXPORT_OPTS)
  exp = runtime.load_export(out)
  assert exp.no_repeat_ngram_size == 2
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["inference"]["no_repeat_ngram_size"] == 2
  ours, ref = exp.generate(TEXTS, max_new_tokens=8), gen.generate(TEXTS, max_new_tokens=8)
  assert [c[0]["code"] for c in ours] == [c[0]["code"] for c in ref]   # the ban itself:
  # test_sampling.test_no_repeat_ngram_size_bans_repeated_ngrams_in_every_strategy
  plain = CodeGenerator.from_checkpoint(str(workdir)).generate(TEXTS, max_new_tokens=8)
  assert [c[0]["code"] for c in plain] != [c[0]["code"] for c in ours]
