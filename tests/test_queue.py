"""InfoNCE's memory queue in the train state (config.train.queue_size): replicated on 8 fake
devices, pushed with the step's own vectors in batch order (also across microbatches), used
from train.queue_start on, kept by a checkpoint round trip; off, the state is the old one."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import sharding
from flax_albert_code.training import checkpoint
from flax_albert_code.training import losses
from flax_albert_code.training import optim
from flax_albert_code.training import step as train_step

B, LD, LC = 8, 16, 32


def _config(**train):
  c = config_lib.get_config("tiny")
  c.data.max_desc_len, c.data.max_code_len = LD, LC
  c.train.update({"batch_size": B, "queue_size": 2 * B, "queue_start": 2, "warmup_steps": 0,
                  **train})
  c.mesh.update(data=2, fsdp=2, tensor=2)
  return c


def _batch(i: int) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(i)
  return {"desc_ids": rs.randint(6, 500, (B, LD)).astype(np.int32),
          "code_ids": rs.randint(6, 500, (B, LC)).astype(np.int32)}


def _vectors(model, params, batch):
  """(v_d, v_c) of `batch` under `params`, on one device."""
  out = model.apply({"params": params["model"]}, batch["desc_ids"], batch["code_ids"],
                    decode=False)
  return out["desc"].vector_BxA, out["code"].vector_BxA


def _start(config):
  model, _ = model_lib.build(config)
  tx = optim.make(config.train)
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_step.create_state(model, tx, config, mesh, jax.random.PRNGKey(0))
  return model, tx, mesh, state, shardings


@pytest.mark.parametrize("microbatches", [2])  # 1 is the default path every other test runs
def test_steps_on_eight_devices_push_each_batch_and_use_the_queue_from_queue_start(microbatches):
  config = _config(microbatches=microbatches)
  model, tx, mesh, state, shardings = _start(config)
  assert isinstance(state, train_step.QueueTrainState)
  for x in jax.tree.leaves(state.queue):
    assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
  with jax.set_mesh(mesh):
    train, evaluate = train_step.jit_steps(model, tx, config, mesh, shardings)
    compiled = train_step.precompile(train, evaluate, state, config, mesh, B, (LC,))
    fills, pushed = [], []
    for i in range(3):
      pushed.append(_vectors(model, jax.device_get(state.params), _batch(i)))
      state, metrics = compiled[train_step.program_key("train", _batch(i))](state, _batch(i))
      assert "queue_rows" not in metrics and np.isfinite(float(metrics["loss"]))
      fills.append(float(metrics["queue_fill"]))
    eval_metrics = compiled[train_step.program_key("eval", _batch(9))](state.params, _batch(9))
  # Steps 0 and 1 come before queue_start=2 (the queue fills but is not used); step 2 uses the
  # two batches pushed before it; the third push wraps to the start.
  assert fills == [0.0, 0.0, 1.0]
  assert int(state.queue["ptr"]) == B and bool(state.queue["valid_Q"].all())
  queue = jax.device_get(state.queue)
  for rows, i in ((slice(0, B), 2), (slice(B, 2 * B), 1)):
    np.testing.assert_allclose(queue["desc_QxA"][rows], pushed[i][0], atol=2e-5)
    np.testing.assert_allclose(queue["code_QxA"][rows], pushed[i][1], atol=2e-5)
  for x in jax.tree.leaves(state.queue):
    assert x.sharding.is_fully_replicated and len(x.sharding.device_set) == 8
  assert set(eval_metrics) >= {"infonce_loss", "retrieval_accuracy"}
  assert "queue_rows" not in eval_metrics and "queue_fill" not in eval_metrics


def test_checkpoint_round_trip_keeps_the_queue(tmp_path):
  config = _config()
  model, tx, mesh, state, shardings = _start(config)
  rs = np.random.RandomState(0)
  rows = [jax.device_put(rs.standard_normal((B, config.model.align_dim)).astype(np.float32),
                         shardings.queue["desc_QxA"]) for _ in range(2)]
  state = state.replace(queue=jax.jit(losses.queue_push, out_shardings=shardings.queue)(
      state.queue, *rows))
  want = jax.device_get(state)
  assert int(want.queue["ptr"]) == B and want.queue["valid_Q"].sum() == B
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, config=config)
  ckpt.close()
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  abstract, _ = train_step.abstract_state(model, tx, config, one)
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  restored, step = ckpt.restore(abstract)
  ckpt.close()
  assert step == 1 and isinstance(restored, train_step.QueueTrainState)
  got = jax.device_get(restored)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_queue_off_is_the_state_of_before_the_queue():
  """Off (the default), the state has no queue field: checkpoints keep their tree, and those
  written before the queue restore (tests/test_compat.py)."""
  config = _config(queue_size=0)
  model, _ = model_lib.build(config)
  abstract, _ = train_step.abstract_state(model, optim.make(config.train), config,
                                          sharding.make_mesh(config.mesh))
  assert type(abstract) is train_step.TrainState and not hasattr(abstract, "queue")
  assert config_lib.get_config().train.queue_size == 0


@pytest.mark.parametrize("train,message", [
    (dict(queue_size=12), r"config.train.queue_size=12 must be a multiple of "
                          r"config.train.batch_size=8 \(or 0: off\)."),
    (dict(align_losses="l2"), r"config.train.queue_size=16 keeps negatives for InfoNCE, which "
                              r"config.train.align_losses does not include; add infonce or set "
                              r"it to 0."),
])
def test_a_bad_queue_config_is_one_sentence(train, message):
  config = _config(**train)
  model, _ = model_lib.build(config)
  with pytest.raises(ValueError, match=f"^{message}$"):
    train_step.make_init(model, optim.make(config.train), config)
