"""The config schema is the one source of hyper-parameters: ModelConfig is built from it and
refuses what it does not know."""
from __future__ import annotations

import dataclasses

import ml_collections
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model.layers import ModelConfig


def test_model_config_fields_are_the_schema_model_section():
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  assert fields == set(config_lib.model_config().keys()) - {"preset"}
  # No defaults of its own that could drift from the schema.
  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ModelConfig))


@pytest.mark.parametrize("preset", sorted(config_lib.MODEL_PRESETS))
def test_default_is_the_schema_preset(preset):
  schema = config_lib.model_config(preset)
  cfg = ModelConfig.default(preset)
  assert dataclasses.asdict(cfg) == {k: v for k, v in schema.items() if k != "preset"}
  assert ModelConfig.from_config(config_lib.get_config(preset).model) == cfg


def test_pooling_default_is_the_schemas():
  # The dataclass once said "cls" while the schema said "mean".
  assert ModelConfig.default().pooling == config_lib.model_config().pooling == "mean"


def test_unknown_key_is_refused_in_one_sentence():
  model = config_lib.get_config("tiny").model.to_dict()
  model["poolling"] = "cls"
  with pytest.raises(ValueError) as err:
    ModelConfig.from_config(model)
  message = str(err.value)
  assert message.startswith("config.model has no field 'poolling'; its fields are ")
  assert "pooling" in message and "vocab_size" in message and message.count(". ") == 0
  with pytest.raises(ValueError, match="config.model has no field 'poolling'"):
    model_lib.build(ml_collections.ConfigDict({"model": model}))   # as training builds it


def test_a_saved_config_without_later_fields_takes_the_schema_defaults():
  """Checkpoints saved before norm_position, fused_qkv and embedding_grad existed (their JSON
  config lacks them) load with the schema's values, which are what the model did then."""
  saved = config_lib.get_config("tiny").model.to_dict()
  for later in ("norm_position", "fused_qkv", "embedding_grad"):
    del saved[later]
  saved["hidden_size"] = 64   # a saved value wins over the preset
  cfg = ModelConfig.from_config(saved)
  assert (cfg.norm_position, cfg.fused_qkv, cfg.embedding_grad) == ("post", True, "scatter")
  assert cfg.hidden_size == 64 and cfg.vocab_size == config_lib.MODEL_PRESETS["tiny"]["vocab_size"]
