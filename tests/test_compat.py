"""A checkpoint written by the code before the package moved into rooms (commit daddfd9;
tests/fixtures/make_old_run.py wrote tests/fixtures/old_run/) still loads with today's code and
gives what the old code gave from it; an export of that time (format 1) is refused with what to
do, since the export format changed to 2 (README, Layout)."""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import flax_albert_code
from flax_albert_code.inference.generator import CodeGenerator
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import sharding
from flax_albert_code.model import checkpoint_io
from flax_albert_code.training import checkpoint
from flax_albert_code.training import optim
from flax_albert_code.training import step as train_step

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "old_run")


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
  """A copy of the fixture (loading must not write into the repository) and what the old code
  recorded."""
  root = tmp_path_factory.mktemp("old_run")
  shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
  with open(root / "expected.json") as f:
    return root, json.load(f)


def _assert_generates_as_before(outs, want):
  """The best greedy candidate of each description: the same code, the same score."""
  got = [c[0] for c in outs]
  assert [c["code"] for c in got] == [c["code"] for c in want["generate"]]
  np.testing.assert_allclose([c["score"] for c in got], [c["score"] for c in want["generate"]],
                             rtol=1e-5)


def test_fixture_is_small():
  total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(FIXTURE) for n in ns)
  assert total < 1 << 20, total


def test_old_checkpoint_loads_and_generates_as_before(old_run, caplog):
  """Its saved config holds fields removed since (model.attention_probs_dropout_prob,
  data.num_workers) and lacks some added since: one log line says so."""
  root, want = old_run
  with caplog.at_level(logging.INFO, logger="flax_albert_code"):
    gen = CodeGenerator.from_checkpoint(str(root / "run"))
  upgraded = [r.getMessage() for r in caplog.records if "older version" in r.getMessage()]
  assert len(upgraded) == 1 and "data.num_workers" in upgraded[0], upgraded
  assert "num_workers" not in gen.config.data
  assert gen.step == want["step"] == 3
  assert gen.cfg.hidden_size == 16 and gen.cfg.pooling == "mean"   # from the saved config
  _assert_generates_as_before(gen.generate(want["descriptions"], strategy="greedy"),
                              want["checkpoint"])
  np.testing.assert_allclose(gen.embed(want["descriptions"], kind="desc"),
                             want["checkpoint"]["embed_desc"], atol=1e-5)
  np.testing.assert_allclose(gen.embed(want["codes"], kind="code"),
                             want["checkpoint"]["embed_code"], atol=1e-5)


def test_old_export_is_refused_with_what_to_do(old_run):
  """Export format 1 (before issue 17) had generate programs without per-candidate keys,
  max_new_tokens, top_k and repetition_penalty inputs: format 2 cannot run them the same way,
  so loading one says so and what to do (export the checkpoint again), and nothing else."""
  root, _ = old_run
  with open(root / "export" / "manifest.json") as f:
    assert json.load(f)["format"] == 1
  with pytest.raises(ValueError, match="format 1.*format 2; export again"):
    flax_albert_code.load_export(str(root / "export"))


def test_old_checkpoint_restores_for_training(old_run):
  """The train state (optimizer included) restores under today's state layout."""
  root, _ = old_run
  ckpt = checkpoint.Checkpointer(str(root / "run"), read_only=True)
  config = ckpt.saved_config()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model, _ = model_lib.build(config)
  abstract, _ = train_step.abstract_state(model, optim.make(config.train), config, mesh)
  state, step = ckpt.restore(abstract)
  ckpt.close()
  _, params, _ = checkpoint_io.load_for_inference(str(root / "run"))
  assert step == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params["model"])), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
