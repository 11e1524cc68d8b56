"""Sequence packing (data/packing.py, model/packing.py): the host plan's invariants, and packed
encoder passes equal to unpacked ones, outputs and gradients, fp32 on CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.config import PAD_ID
from flax_albert_code.data import packing
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import packing as model_packing
from tests.test_model import FAST_CPU, _model, random_params

_jit = functools.partial(jax.jit, compiler_options=FAST_CPU)


def _ids(lengths, width, seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(6, 512, (len(lengths), width)).astype(np.int32)
  for i, n in enumerate(lengths):
    ids[i, n:] = PAD_ID
  return ids


def test_plan_places_every_token_once_within_its_rows():
  lengths = [3, 7, 1, 8, 2, 5, 4, 6, 8, 1, 2, 3]
  ids = _ids(lengths, 8)
  p = packing.plan(ids, groups=2, rows=5, max_segments=3)
  assert p is not None
  per, width, rows = 6, 8, 5
  for g in range(2):
    src, dst = p["src"][g].ravel(), p["dst"][g].ravel()
    real = src < per * width
    # Every real token of the group is in exactly one slot, and dst inverts src.
    assert sorted(src[real]) == [b * width + t for b in range(per)
                                 for t in range(lengths[g * per + b])]
    assert np.array_equal(dst[src[real]], np.flatnonzero(real))
    assert np.all(dst[np.setdiff1d(np.arange(per * width), src[real])] == rows * width)
    for r in range(rows):
      n = p["seqlen"][g, r]
      segs = n[n >= 0]
      assert len(segs) <= 3 and segs.sum() == real.reshape(rows, width)[r].sum()
      starts = p["offsets"][g, r][:len(segs)]
      # Segments are contiguous, in order, and each one example.
      assert np.array_equal(starts, np.cumsum(segs) - segs)
      for s, n_s in zip(starts, segs):
        owners = src[r * width + s:r * width + s + n_s] // width
        assert len(set(owners)) == 1


def test_plan_refuses_what_does_not_fit_and_add_plans_leaves_the_batch_unpacked():
  ids = _ids([8, 8, 8, 1], 8)
  assert packing.plan(ids, groups=1, rows=3, max_segments=4) is None
  assert packing.plan(_ids([1, 1, 1, 1], 8), groups=1, rows=1, max_segments=3) is None
  batch = {"desc_ids": _ids([8] * 15 + [1], 8)}   # 16 examples into 8 rows: no
  assert not packing.Packer(("desc",), 16, {"desc": 0.5}, 4)(batch)
  assert set(batch) == {"desc_ids"}
  packer = packing.Packer(("desc",), 8, {"desc": 1.0}, 4)
  assert packer(batch)
  shapes = packer.shapes(16, {"desc_ids": 8})
  assert {k: v.shape for k, v in batch.items() if k != "desc_ids"} == shapes
  assert set(shapes) == {"desc_pack_src", "desc_pack_dst", "desc_pack_seqlen",
                         "desc_pack_offsets"}
  # Two hosts, each planning its own half of the batch, make the global plan between them.
  halves = [{"desc_ids": batch["desc_ids"][h * 8:(h + 1) * 8]} for h in (0, 1)]
  assert all(packer(half) for half in halves)
  for k in shapes:
    np.testing.assert_array_equal(np.concatenate([half[k] for half in halves]), batch[k])
  with pytest.raises(ValueError, match="right-padded"):
    packing.plan(np.array([[5, 0, 5]], np.int32), 1, 1, 2)
  with pytest.raises(ValueError, match="config.train.pack="):
    config_lib.pack_fields("desc,code")


def test_rows_for():
  assert packing.rows_for(128, 0.4375) == 56
  assert packing.rows_for(128, 0.3) == 39     # 38.4, rounded up
  assert packing.rows_for(4, 1.5) == 4        # never more rows than examples
  assert packing.rows_for(1, 0.1) == 1


@pytest.mark.parametrize("pre_norm", [False, True])
def test_packed_encoding_equals_unpacked(pre_norm):
  """States at real tokens, pooled and alignment vectors, and the gradients of a loss on them,
  packed (3 rows for 6 examples, 2 groups) vs one example a row."""
  model = _model(norm_position="pre" if pre_norm else "post", pooling="mean")
  params = random_params(model)
  desc = _ids([8, 3, 4, 2, 5, 1], 8, seed=3)
  rows = packing.plan(desc, groups=2, rows=2, max_segments=3)   # 3 examples a group in 2 rows
  plan = model_packing.Packed(*(jnp.asarray(rows[k]) for k in ("src", "dst", "seqlen", "offsets")))

  def loss(p, packed):
    enc = model.apply({"params": p}, jnp.asarray(desc), method=model_lib.CodeModel.encode,
                      packed=packed)
    states = jnp.where(enc.mask_BxL[..., None], enc.states_BxLxH, 0.0)
    return jnp.sum(states ** 2) + jnp.sum(enc.vector_BxA * jnp.arange(enc.vector_BxA.shape[1])), enc

  grad = _jit(jax.value_and_grad(loss, has_aux=True))
  (l0, e0), g0 = grad(params, None)
  (l1, e1), g1 = grad(params, plan)
  m = np.asarray(e0.mask_BxL)
  np.testing.assert_allclose(np.asarray(e1.states_BxLxH)[m], np.asarray(e0.states_BxLxH)[m],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(e1.vector_BxA, e0.vector_BxA, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)


def test_batch_flops_count_the_context_and_the_packed_rows():
  """The Trainer's and bench_realdata's FLOPs a step: with a retrieval context the decoder
  attends to the context and the context is encoded too; packed passes count their rows."""
  from flax_albert_code.training import metrics
  mc = _model().cfg
  f = functools.partial(metrics.train_flops_per_example, mc)
  enc = lambda n: f(n, 0, generation=False, align=False)
  batch = {"desc_ids": np.zeros((8, 16), np.int32), "code_ids": np.zeros((8, 32), np.int32)}
  assert metrics.batch_flops(mc, batch) == 8 * f(16, 32)
  batch["ctx_ids"] = np.zeros((8, 48), np.int32)
  assert metrics.batch_flops(mc, batch) == 8 * (f(48, 32) + enc(16))
  assert metrics.batch_flops(mc, batch, generation=False) == 8 * f(16, 32, generation=False)
  batch["desc_pack_src"] = np.zeros((2, 1, 16), np.int32)   # 2 rows for 8 descriptions
  batch["ctx_pack_src"] = np.zeros((2, 3, 48), np.int32)    # 6 rows for 8 contexts
  # The context encoder is inside f(48, 32) (its "description" pass): 2 of 8 rows not computed.
  np.testing.assert_allclose(metrics.batch_flops(mc, batch),
                             8 * f(48, 32) - 2 * enc(48) + 2 * enc(16), rtol=1e-12)
