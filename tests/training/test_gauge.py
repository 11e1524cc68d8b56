"""The reading gauge (training/gauge.py): the spread of collapsed and of distinct states, the
warning's thresholds. (A retrieval run writing the gauge: tests/retrieval/test_retriever.py.)"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flax_albert_code.training import gauge


def test_spread_is_zero_for_one_state_and_positive_for_distinct_ones():
  mask = jnp.array([[True, True, True, False]])
  same = jnp.tile(jnp.arange(1.0, 5.0)[None, None, :], (1, 4, 1))
  total, n = gauge.encoder_spread(same, mask)
  assert float(n) == 3 and float(total) < 1e-6
  # Padding is not counted: a different state there changes nothing.
  total_pad, _ = gauge.encoder_spread(same.at[0, 3].set(-7.0), mask)
  assert float(total_pad) < 1e-6
  rs = np.random.RandomState(0)
  total, n = gauge.encoder_spread(jnp.asarray(rs.standard_normal((1, 4, 16))), mask)
  assert 0.5 < float(total) / float(n) < 1.5


def test_the_warning_names_what_is_wrong_and_waits_for_warmup():
  reads = {"input_gap": 0.3, "encoder_spread": 0.8, "copy_gap": 1.0}
  assert gauge.problem(reads, 500, warmup=100) is None
  assert gauge.problem({**reads, "input_gap": 0.01}, 50, warmup=100) is None   # in warmup
  assert "barely reads its input" in gauge.problem({**reads, "input_gap": 0.01}, 500, 100)
  assert "collapse" in gauge.problem({**reads, "encoder_spread": 0.01}, 50, 100)
  out = gauge.finish({"own": 10.0, "other": 13.0, "copy": 4.0, "tokens": 5.0, "spread": 2.0,
                      "real": 4.0})
  assert out == {"input_gap": 0.6, "copy_gap": 1.2, "encoder_spread": 0.5}
