"""Exports: contents, greedy parity with the checkpoint, refusal of altered files, the command."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from export_util import CODES, DESCRIPTIONS, shared_export, subprocess_env
from flax_albert_code import export as export_cmd
from flax_albert_code.inference import postprocess as batching

from flax_albert_code.retrieval import index as index_lib
from flax_albert_code.inference import model_decoding
from flax_albert_code.deploy import runtime as serving
from flax_albert_code.inference.generator import CodeGenerator
from flax_albert_code.utils import files


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def exp(run):
  return serving.load_export(run[1])


@pytest.fixture(scope="module")
def gen(run):
  return CodeGenerator.from_checkpoint(run[0])


def test_a_relative_checkpoint_path_loads(run, gen, monkeypatch):
  """orbax refuses relative paths; the loader makes them absolute (`runs/small` from the README)."""
  monkeypatch.chdir(os.path.dirname(run[0]))
  rel = CodeGenerator.from_checkpoint(os.path.basename(run[0]))
  assert rel.step == gen.step == 7 and rel.checkpoint_path == gen.checkpoint_path
  assert os.path.isabs(rel.checkpoint_path)


def test_export_holds_every_file_with_its_digest(run):
  out = run[1]
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  on_disk = {os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out)
             for n in names}
  assert on_disk == set(manifest["files"]) | {"manifest.json"}
  for rel, want in manifest["files"].items():
    assert files.sha256(os.path.join(out, rel)) == want["sha256"]
    assert os.path.getsize(os.path.join(out, rel)) == want["size"]
  assert {"config.json", "spm.model", "params.safetensors", "hf_encoder/config.json",
          "hf_encoder/model.safetensors"} <= on_disk
  names = {p["name"] for p in manifest["programs"]}
  assert names == {f"encode_b{b}_w{w}" for b in (1, 4) for w in (16, 24, 32)} | {
      f"generate_{s}_b{b}_t12" for s in ("greedy", "sample", "beam") for b in (1, 4)}
  assert all(os.path.isfile(os.path.join(out, p["file"])) for p in manifest["programs"])
  assert "cpu" in manifest["platforms"] and manifest["platforms_note"]
  assert manifest["step"] == 7 and manifest["valid_metrics"]["valid_loss"] == 3.5
  assert {"jax", "jaxlib", "flax", "python"} <= set(manifest["versions"])
  # No pickle anywhere: every file is JSON, safetensors, sentencepiece or a flatbuffer.
  for rel in on_disk:
    with open(os.path.join(out, rel), "rb") as f:
      assert not f.read(2).startswith(b"\x80"), rel
  assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]


def test_greedy_from_the_export_is_token_identical_to_the_checkpoint(exp, gen):
  descs = DESCRIPTIONS[:3]          # the bucket of 4, one row of padding
  ours, ref = exp.generate(descs), gen.generate(descs)
  assert [c[0]["code"] for c in ours] == [c[0]["code"] for c in ref]
  assert [c[0]["score"] for c in ours] == [c[0]["score"] for c in ref]
  tokens, scores = exp.generate_tokens(descs)
  for start, size, bucket in batching.chunks(len(descs), gen.batch_buckets):
    batch = np.zeros((bucket, gen.max_desc_len), np.int32)
    for j, d in enumerate(descs[start:start + size]):
      ids = gen.tokenizer.encode_description(d, gen.max_desc_len)
      batch[j, :len(ids)] = ids
    t, s = model_decoding.generate(gen.model, gen.variables, batch, strategy="greedy",
                                   max_new_tokens=gen.default_max_new_tokens)
    np.testing.assert_array_equal(tokens[start:start + size], np.asarray(t)[:size])
    np.testing.assert_array_equal(scores[start:start + size], np.asarray(s)[:size])


def test_export_and_checkpoint_agree_on_cut_outputs_and_seeded_samples(exp, gen):
  """One meaning of score and finish_reason: a program compiled for 12 tokens asked for 5
  stops there, as the checkpoint decoding 5 does; samples use the same per-candidate keys."""
  descs = DESCRIPTIONS[:3]
  for kw in (dict(max_new_tokens=5), dict(max_new_tokens=5, strategy="beam", num_samples=2),
             dict(strategy="sample", num_samples=3, seed=4, temperature=1.5, top_k=40,
                  top_p=0.95, repetition_penalty=1.3)):
    ours, ref = exp.generate(descs, **kw), gen.generate(descs, num_beams=exp.num_beams, **kw)
    for a, b in zip(ours, ref):
      assert [c["code"] for c in a] == [c["code"] for c in b], kw
      assert [c["finish_reason"] for c in a] == [c["finish_reason"] for c in b], kw
      np.testing.assert_allclose([c["score"] for c in a], [c["score"] for c in b], rtol=1e-5)
  cut = exp.generate(descs, max_new_tokens=5)
  assert all(isinstance(c[0]["score"], float) for c in cut)
  assert {c[0]["finish_reason"] for c in cut} <= {"eos", "length"}
  assert any(c[0]["finish_reason"] == "length" for c in cut)


def test_float32_greedy_gives_the_same_tokens_alone_and_batched(exp):
  """Buckets 1 and 4, first row or not: the same code; scores agree to float32 rounding (XLA's
  CPU matmuls sum in an order that depends on the batch size, README: bf16 drifts more)."""
  alone = [exp.generate([d])[0][0] for d in DESCRIPTIONS]
  batched = [c[0] for c in exp.generate(DESCRIPTIONS)]
  rotated = [c[0] for c in exp.generate(DESCRIPTIONS[3:] + DESCRIPTIONS[:3])]
  rotated = rotated[3:] + rotated[:3]
  for a, b, c in zip(alone, batched, rotated):
    assert a["code"] == b["code"] == c["code"] and a["finish_reason"] == b["finish_reason"]
    np.testing.assert_allclose([b["score"], c["score"]], a["score"], rtol=1e-6)


def test_embeddings_match_the_checkpoint_and_search_ranks_by_them(exp, gen, tmp_path):
  np.testing.assert_allclose(exp.embed(DESCRIPTIONS[:3], "desc"),
                             gen.embed(DESCRIPTIONS[:3], "desc"), atol=1e-6)
  codes = exp.embed(CODES, "code")          # two code widths, each padded to a bucket
  assert codes.shape == (len(CODES), exp.align_dim)
  np.testing.assert_allclose(codes[:1], gen.embed(CODES[:1], "code"), atol=1e-6)
  items = [{"name": f"f{i}", "path": "m.py", "lineno": i + 1, "description": d, "code": c}
           for i, (d, c) in enumerate(zip(DESCRIPTIONS, CODES))]
  index_dir = tmp_path / "index"        # the layout `python -m flax_albert_code.search` saves
  index_dir.mkdir()
  np.save(index_dir / "vectors.npy", codes)
  (index_dir / "items.json").write_text(json.dumps(items))
  exp.load_index(str(index_dir))
  queries = ["reverse a string", "count lines"]
  got = exp.search(queries, k=3)
  best = np.argsort(-(exp.embed(queries, "desc") @ codes.T), axis=1, kind="stable")[:, :3]
  assert [[h["name"] for h in q] for q in got] == [[f"f{i}" for i in row] for row in best]
  assert [h["rank"] for h in got[0]] == [1, 2, 3]
  corpus = tmp_path / "corpus.jsonl"      # a corpus embedded when loaded
  corpus.write_text("".join(json.dumps(it) + "\n" for it in items))
  again = exp.search(queries, k=3, index=exp.load_index(str(corpus)))
  assert [h["name"] for h in again[1]] == [h["name"] for h in got[1]]
  with pytest.raises(serving.ExportError, match="16-dimensional"):
    exp.load_index(index_lib.Index(codes[:, :3], items))


def test_loading_and_generating_need_neither_flax_nor_orbax(run, exp):
  code = ("import sys, json, flax_albert_code as f\n"
          f"e = f.load_export({run[1]!r})\n"
          f"out = e.generate({DESCRIPTIONS[:1]!r})\n"
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax', 'optax', "
          "'grain', 'tensorflow', 'tensorflow_datasets'})\n"
          "print(json.dumps([out[0][0]['code'], heavy]))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=subprocess_env(run[1]),
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  code_out, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
  assert heavy == [] and code_out == exp.generate(DESCRIPTIONS[:1])[0][0]["code"]


def _flip_a_bit(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage, file, words", [
    (_flip_a_bit, "programs/generate_greedy_b4_t12.jaxexport", "does not match its sha256"),
    (lambda p: open(p, "r+b").truncate(100), "params.safetensors", "is 100 bytes, not the"),
    (os.remove, "spm.model", "is missing"),
    (os.remove, "manifest.json", "is missing"),
    (lambda p: open(p, "w").write("{"), "manifest.json", "cannot be read"),
])
def test_a_damaged_export_is_refused_naming_the_file(run, tmp_path, damage, file, words):
  out = str(tmp_path / "exp")
  shutil.copytree(run[1], out)
  damage(os.path.join(out, file))
  with pytest.raises(serving.ExportError, match=words) as info:
    serving.load_export(out)
  assert os.path.join(out, file) in str(info.value) and str(info.value).endswith(".")


def test_export_command_writes_bf16(run, exp, tmp_path, capsys):
  out = str(tmp_path / "bf16")
  os.makedirs(out)
  open(os.path.join(out, "stray.txt"), "w").write("not an export")
  argv = ["--checkpoint", run[0], "--out", out, "--dtype", "bf16", "--buckets", "1",
          "--strategies", "greedy", "--no-hf-encoder"]
  assert export_cmd.main(argv) == 1
  assert "is not an export" in capsys.readouterr().err
  os.remove(os.path.join(out, "stray.txt"))
  assert export_cmd.main(argv) == 0
  assert "4 programs" in capsys.readouterr().out     # greedy and 3 encoder widths, batch 1
  exp16 = serving.load_export(out)
  kinds = {str(x.dtype) for x in __import__("jax").tree.leaves(exp16.variables)}
  assert kinds == {"bfloat16", "float32"}        # matrices bf16, vectors (norms, biases) f32
  assert exp16.manifest["dtype"] == "bfloat16" and exp16.strategies == ["greedy"]
  np.testing.assert_allclose(exp16.embed(["add two numbers"]), exp.embed(["add two numbers"]),
                             atol=0.05)                  # bf16 rounding, the same function
  with pytest.raises(ValueError, match="no 'beam' programs"):
    exp16.generate(["add two numbers"], strategy="beam")
  assert export_cmd.main(["--checkpoint", str(tmp_path / "nope"), "--out", out]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_a_new_export_replaces_an_old_one_whole(tmp_path):
  old, new = tmp_path / "exp", tmp_path / ".exp.tmp-1"
  for d, name in ((old, "old.txt"), (new, "new.txt")):
    d.mkdir()
    (d / name).write_text(name)
  files.publish(str(new), str(old))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
  assert [p.name for p in old.iterdir()] == ["new.txt"]


@pytest.mark.parametrize("argv, words", [
    (["--platforms", "foo"], "error: Unknown or no platforms ['foo']; choose from cpu, cuda"),
    (["--buckets", "abc"], "error: --buckets takes comma-separated whole numbers"),
    (["--buckets", "0,4"], "error: --buckets values must be at least 1"),
    (["--lengths", "8,x"], "error: --lengths takes comma-separated whole numbers"),
    (["--strategies", "nucleus"], "error: Unknown or no strategies ['nucleus']"),
    (["--dtype", "f16"], "error: Unknown export dtype 'f16'"),
])
def test_export_command_refuses_bad_options_before_reading_the_checkpoint(
    run, tmp_path, capsys, monkeypatch, argv, words):
  monkeypatch.setattr(CodeGenerator, "from_checkpoint",
                      lambda *a, **k: pytest.fail("read the checkpoint before the options"))
  out = tmp_path / "exp"
  assert export_cmd.main(["--checkpoint", run[0], "--out", str(out), *argv]) == 1
  err = capsys.readouterr().err
  assert err.startswith(words) and len(err.splitlines()) == 1, err
  assert not out.exists()


def test_export_command_is_quiet_and_writes_files_readable_like_a_build(run, tmp_path, capfd):
  out = tmp_path / "sub" / "exp"
  out.mkdir(parents=True)   # an earlier export there, which a server may be running from
  (out / "manifest.json").write_text(json.dumps({"step": 3, "created": "2026-12-01T10:00:00"}))
  assert export_cmd.main(["--checkpoint", run[0], "--out", str(out), "--buckets", "1",
                          "--strategies", "greedy"]) == 0
  captured = capfd.readouterr()
  assert "WARNING" not in captured.err and "absl" not in captured.err, captured.err
  assert "4 programs" in captured.out
  assert captured.out.splitlines()[-1] == (
      "It replaced the export that was there (step 3, made 2026-12-01T10:00:00); a server "
      "running from it keeps serving what it loaded until it is restarted.")
  umask = os.umask(0)
  os.umask(umask)
  for d, _, names in os.walk(out):
    assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask, d
    for name in names:
      assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_export_command_refuses_a_file_for_out_before_reading_the_checkpoint(
    run, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(CodeGenerator, "from_checkpoint",
                      lambda *a, **k: pytest.fail("read the checkpoint before --out"))
  (tmp_path / "f").write_text("x")
  assert export_cmd.main(["--checkpoint", run[0], "--out", str(tmp_path / "f")]) == 1
  err = capsys.readouterr().err
  assert err == (f"error: {tmp_path / 'f'} exists and is not an export; choose another --out "
                 "or empty it.\n")
