"""The config schema is the one source of hyper-parameters: ModelConfig is built from it and
refuses what it does not know. The shipped configs (one file per use, variants as an argument)
give every value the one-file-per-name configs gave."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import ml_collections
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.configs import common
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model.layers import ModelConfig


def test_model_config_fields_are_the_schema_model_section():
  """ModelConfig's fields are made from the schema's model section: a field is declared once."""
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  assert fields == [k for k in config_lib.model_config().keys() if k != "preset"]
  # No defaults of its own that could drift from the schema.
  assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(ModelConfig))
  cfg = ModelConfig.default("tiny")
  assert hash(cfg) == hash(ModelConfig.default("tiny")) and ModelConfig.__module__ == (
      "flax_albert_code.model.layers")


def test_a_loaded_config_has_every_field_of_the_schema():
  """config.upgrade is the one place a saved config's missing fields are filled, so loading code
  reads fields directly instead of `.get(name, default)`."""
  saved = config_lib.get_config("tiny").to_dict()
  del saved["train"]["loss_chunk"], saved["retrieval"]["self_neighbour_rate"]
  config, changes = config_lib.upgrade(ml_collections.ConfigDict(saved))
  assert config.train.loss_chunk == 128 and config.retrieval.self_neighbour_rate == 0.0
  assert changes == []


@pytest.mark.parametrize("preset", sorted(config_lib.MODEL_PRESETS))
def test_default_is_the_schema_preset(preset):
  schema = config_lib.model_config(preset)
  cfg = ModelConfig.default(preset)
  assert dataclasses.asdict(cfg) == {k: v for k, v in schema.items() if k != "preset"}
  assert ModelConfig.from_config(config_lib.get_config(preset).model) == cfg


def test_layer_kernels_refuse_sizes_that_do_not_tile_at_config_time():
  cfg = ModelConfig.default("tiny")
  dataclasses.replace(cfg, decode_attention="layer")   # 32 / 64: fine
  with pytest.raises(ValueError, match="'layer' needs a power-of-two head size .* and "
                                       "hidden_size and intermediate_size multiples of 16"):
    dataclasses.replace(cfg, decode_attention="layer", intermediate_size=72)
  with pytest.raises(ValueError, match="'layer' needs a power-of-two head size"):
    dataclasses.replace(cfg, decode_attention="layer", hidden_size=48, num_attention_heads=2)
  # "auto" falls back to XLA instead of failing.
  assert not dataclasses.replace(cfg, intermediate_size=72).decode_layer_kernels
  # A config saved when decode_attention could be "pallas" (the attention kernels alone).
  assert ModelConfig.from_config({**dataclasses.asdict(cfg), "decode_attention": "pallas"}
                                 ).decode_attention == "auto"


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
  """Checkpoints saved before norm_position and fused_qkv existed (their JSON config lacks them)
  load with the schema's values, which are what the model did then."""
  saved = config_lib.get_config("tiny").model.to_dict()
  for later in ("norm_position", "fused_qkv"):
    del saved[later]
  saved["hidden_size"] = 64   # a saved value wins over the preset
  cfg = ModelConfig.from_config(saved)
  assert (cfg.norm_position, cfg.fused_qkv) == ("post", True)
  assert cfg.hidden_size == 64 and cfg.vocab_size == config_lib.MODEL_PRESETS["tiny"]["vocab_size"]


def test_a_saved_config_with_removed_fields_loads_without_them():
  """A checkpoint's config from before a feature was removed: every field of
  config.REMOVED_FIELDS is dropped (one list for the log line), the rest is kept, and the model
  builds from it."""
  saved = config_lib.get_config("tiny").to_dict()
  for section, fields in config_lib.REMOVED_FIELDS.items():
    for name in fields:
      saved[section][name] = 0.5
  saved["model"]["hidden_size"] = 64
  del saved["model"]["copy_head"]
  config, changes = config_lib.upgrade(ml_collections.ConfigDict(saved))
  removed = [f"{s}.{n}" for s, names in config_lib.REMOVED_FIELDS.items() for n in names]
  assert changes == ["model.copy_head=False"] + removed
  assert all(n not in config[s] for s, names in config_lib.REMOVED_FIELDS.items() for n in names)
  assert config.model.hidden_size == 64 and not config.model.copy_head
  assert ModelConfig.from_config(saved["model"]).hidden_size == 64   # a raw mapping too
  model_lib.build(config)
  with pytest.raises(ValueError, match="config.model has no field 'hidden_sise'"):
    ModelConfig.from_config({**saved["model"], "hidden_sise": 64})


PINS = os.path.join(os.path.dirname(__file__), "fixtures", "configs_10e094a.json")


def _leaves(tree, path=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, path + (k,))
  else:
    yield ".".join(path), tree


@pytest.mark.parametrize("name,specs", [
    ("default", ["default", "configs/default.py"]),
    ("tiny", ["tiny", "configs/tiny.py"]),
    ("base", ["base", "configs/base.py", "configs/albert.py:base", "albert",
              "albert.py:size=base"]),
    ("large", ["large", "configs/large.py", "configs/albert.py:large", "albert:size=large"]),
    ("quality", ["quality", "configs/quality.py"]),
])
def test_every_name_gives_the_values_it_gave_before_the_configs_moved(name, specs):
  """tests/fixtures/configs_10e094a.json holds every field of the five configs as their own
  files gave them (tests/fixtures/make_config_pins.py); fields added since may only add, fields
  removed since (config.REMOVED_FIELDS) are not compared. Changed on purpose since: base
  train.loss_chunk 128 -> 0 (the CE in one pass: -7% a BENCH-A step)."""
  removed = {f"{section}.{field}" for section, fields in config_lib.REMOVED_FIELDS.items()
             for field in fields}
  with open(PINS) as f:
    want = {k: v for k, v in _leaves(json.load(f)[name])
            if not any(k == r or k.startswith(r + ".") for r in removed)}
  assert want["model.preset"] == ("small" if name == "default" else
                                  "base" if name == "quality" else name)
  for spec in specs:
    got = dict(_leaves(json.loads(json.dumps(config_lib.load_config(spec).to_dict()))))
    diff = {k: (v, got.get(k, "<missing>")) for k, v in want.items() if got.get(k) != v}
    assert not diff, (spec, diff)
    config_lib.validate(config_lib.load_config(spec))


def test_key_values_of_the_shipped_configs():
  """A readable excerpt of the pins above."""
  base, large = config_lib.load_config("base"), config_lib.load_config("large")
  assert (base.name, base.model.hidden_size, base.model.dtype, base.model.scan_layers,
          base.train.logits_dtype, base.train.learning_rate, base.train.steps) == (
              "base", 768, "bfloat16", False, "bfloat16", 2e-4, 20000)
  assert (large.name, large.model.hidden_size, large.model.remat, large.model.scan_layers,
          large.train.logits_dtype, large.train.learning_rate, large.train.steps) == (
              "large", 1024, "full", True, "float32", 3e-4, 50000)
  quality = config_lib.load_config("quality")
  assert (quality.model.norm_position, quality.model.pooling, quality.train.batch_size,
          quality.model.attention_impl) == ("pre", "first_last", 128, "cudnn")
  tiny, default = config_lib.load_config("tiny"), config_lib.load_config("default")
  assert (tiny.model.hidden_size, tiny.train.steps, tiny.data.code_buckets) == (32, 20, (32, 64))
  assert (default.model.preset, default.train.steps, default.train.learning_rate) == (
      "small", 800, 5e-4)


def test_a_bad_variant_is_one_sentence():
  with pytest.raises(ValueError, match=r"^configs/albert.py has no size 'huge'; use one of "
                                       r"base, large\.$"):
    config_lib.load_config("albert:huge")
  with pytest.raises(FileNotFoundError, match=r"give a path or a shipped config \(albert, base, "
                                              r"default, large, quality, tiny\)"):
    config_lib.load_config("configs/nope.py")


@pytest.mark.parametrize("command,spec", [("train", "nosuch"), ("prepare", "nosuch.py:arg")])
def test_a_missing_config_is_one_line_listing_the_shipped_ones(command, spec, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", f"flax_albert_code.{command}", "--config", spec,
                         "--workdir", str(tmp_path / "w")], cwd=repo, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1 and proc.stderr.splitlines() == [
      f"error: --config {spec}: no such config file; give a path or a shipped config (albert, "
      "base, default, large, quality, tiny)."], proc.stderr
  assert not (tmp_path / "w").exists()


def test_parse_arg():
  spec = dict(size="base", steps=10, lr=1e-3, runlocal=False)
  assert common.parse_arg(None, **spec).to_dict() == spec
  assert common.parse_arg("", **spec).to_dict() == spec
  assert common.parse_arg("large", **spec).size == "large"             # the first option
  got = common.parse_arg("runlocal,steps=3,lr=0.5", **spec)
  assert (got.size, got.steps, got.lr, got.runlocal) == ("base", 3, 0.5, True)
  assert common.parse_arg("runlocal=false", **spec).runlocal is False
  with pytest.raises(ValueError, match=r"^config argument 'sise' is not an option of this "
                                       r"config; its options are size, steps, lr, runlocal\.$"):
    common.parse_arg("sise=large", **spec)
  with pytest.raises(ValueError, match=r"^config argument steps='many' is not a valid int "
                                       r"\(its default is 10\)\.$"):
    common.parse_arg("steps=many", **spec)
  with pytest.raises(ValueError, match="given twice"):
    common.parse_arg("large,size=base", **spec)


def test_reading_the_input_options_are_on_where_chosen():
  """Fields added after the pins: denoising on unlabelled code (train.unlabelled_schedule) is on
  only in configs/quality.py, self-neighbours (retrieval.self_neighbour_rate) also in the default
  CPU run (issue 30: both chosen on the valid split), so the other shipped runs and their
  checkpoints are unchanged."""
  for name in config_lib.shipped_names():
    config = config_lib.load_config(name)
    assert bool(config.train.unlabelled_schedule) == (name == "quality"), name
    assert (config.retrieval.self_neighbour_rate > 0) == (name in ("quality", "default")), name


@pytest.mark.parametrize("field,bad,want", [
    ("train.learning_rate", -1.0, "positive"), ("train.learning_rate", 0.0, "positive"),
    ("train.warmup_steps", -1, "at least 0"), ("train.l2_weight", -0.01, "at least 0"),
    ("model.hidden_dropout_prob", 1.0, "in [0, 1)"), ("data.valid_fraction", -0.1, "in [0, 1)"),
    ("train.batch_size", 0, "at least 1"), ("train.microbatches", 0, "at least 1"),
    ("retrieval.self_neighbour_rate", 1.0, "in [0, 1)"),
    ("data.max_desc_len", 0, "at least 1"), ("retrieval.max_ctx_len", 0, "at least 1"),
    ("sample.temperature", -1.0, "positive"),
    ("sample.top_p", 0.0, "in (0, 1]"), ("data.test_fraction", 1.5, "in [0, 1)"),
    ("train.log_every", 0, "at least 1"), ("sample.repetition_penalty", 0.5, "at least 1")])
def test_numbers_out_of_range_are_refused_naming_the_field(field, bad, want):
  config = config_lib.get_config("tiny")
  section, name = field.split(".")
  config_lib.validate(config)   # the default is in range
  config[section][name] = bad
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert str(e.value) == f"config.{field}={bad} must be {want}."


def test_every_ranged_field_exists_and_every_shipped_value_is_in_range():
  schema = config_lib.get_config()
  for path in config_lib.RANGES:
    section, name = path.split(".")
    assert name in schema[section], path   # a renamed field is not left unchecked
  for name in config_lib.shipped_names():
    config_lib.validate(config_lib.load_config(name))
  config = config_lib.get_config("tiny")
  config.mesh.fsdp = 0
  with pytest.raises(ValueError, match=r"config.mesh.fsdp=0 must be a number of devices, or -1"):
    config_lib.validate(config)
  config = config_lib.get_config("tiny")
  config.data.update(valid_fraction=0.5, test_fraction=0.5)
  with pytest.raises(ValueError, match="leaves no train split"):
    config_lib.validate(config)


@pytest.mark.parametrize("field,good,bad", [("model.decode_attention", "layer", "pallas")])
def test_closed_choices_are_refused_naming_the_field_and_the_values(field, good, bad):
  config = config_lib.get_config("tiny")
  section, name = field.split(".")
  config[section][name] = good
  config_lib.validate(config)
  config[section][name] = bad
  with pytest.raises(ValueError, match=f"config.{field}='{bad}' is not one of"):
    config_lib.validate(config)
