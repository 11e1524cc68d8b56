"""Parity with Hugging Face ALBERT (PyTorch) on the same weights, and the HF weight round trip.

GOLDEN tests run without torch against tests/fixtures/hf_albert_tiny (made by
tests/fixtures/make_hf_golden.py). LIVE tests build random transformers.AlbertModels and need
torch (`pip install torch==2.13.0`, the CPU wheel); they are skipped without it.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flax_albert_code import config as config_lib
from flax_albert_code.model import hf
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model.layers import ModelConfig

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf_albert_tiny")
ATOL = 1e-5  # max abs, float32
FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, compiler_options=FAST_CPU)


def _model_config(hf_config: dict):
  """Our model config for an HF config (tiny decoder around it; [CLS] pooling as ALBERT)."""
  base = config_lib.get_config("tiny")
  base.model.pooling = "cls"   # ALBERT's pooler, compared with HF's pooler_output
  m = hf.model_config_from_hf(hf_config, base)
  assert m.pooling == "cls"
  return m


def _random_params(model_cfg, seed: int = 0) -> dict:
  """A full CodeModel tree drawn with numpy (no init compile)."""
  model = model_lib.CodeModel(ModelConfig.from_config(model_cfg))
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"])
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rs.normal(0, 0.2, s.shape), s.dtype), shapes)


def _encode(model_cfg, params, ids, mask=None, token_types=None):
  model = model_lib.CodeModel(ModelConfig.from_config(model_cfg))
  fn = _jit(lambda p, i, m, t: model.apply({"params": p}, i, attention_mask=m, token_type_ids=t,
                                           method="encode"))
  enc = fn(params, ids, mask, token_types)
  return np.asarray(enc.states_BxLxH), np.asarray(enc.pooled_BxH)


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _golden():
  g = np.load(os.path.join(FIXTURE, "golden.npz"))
  return {k: g[k] for k in g.files}


def _paths(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------------------------
# GOLDEN: no torch needed.

def test_golden_parity_without_torch():
  g = _golden()
  params, model_cfg = hf.load_hf_encoder(FIXTURE, config=config_lib.get_config("tiny"))
  assert (model_cfg.num_hidden_groups, model_cfg.inner_group_num) == (2, 2)
  assert model_cfg.hidden_size == 32 and model_cfg.decoder_layers == 2  # tiny decoder kept
  states, pooled = _encode(model_cfg, params, g["input_ids"], g["attention_mask"],
                           g["token_type_ids"])
  err_s = _max_abs(states, g["last_hidden_state"])
  err_p = _max_abs(pooled, g["pooler_output"])
  print(f"\ngolden parity (2 groups x 2 inner, masked batch): last_hidden_state {err_s:.2e}, "
        f"pooler_output {err_p:.2e}")
  assert err_s < ATOL and err_p < ATOL
  # Our own padding path (lengths from PAD ids, no explicit mask) on the right-padded rows.
  rows = [0, 1]
  states, pooled = _encode(model_cfg, params, g["input_ids"][rows], None,
                           g["token_type_ids"][rows])
  assert _max_abs(states, g["last_hidden_state"][rows]) < ATOL
  assert _max_abs(pooled, g["pooler_output"][rows]) < ATOL


def test_load_keeps_decoder_and_handles_prefixed_headless_checkpoints(tmp_path):
  """AlbertForMaskedLM-style keys (`albert.` prefix, MLM head, no pooler) into given params."""
  weights = load_file(os.path.join(FIXTURE, "model.safetensors"))
  mlm = {f"albert.{k}": v for k, v in weights.items() if not k.startswith("pooler.")}
  mlm["predictions.bias"] = np.zeros(100, np.float16)
  save_file(mlm, str(tmp_path / "model.safetensors"))
  shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path / "config.json")
  with open(tmp_path / "config.json") as f:
    model_cfg = _model_config(json.load(f))
  before = _random_params(model_cfg, seed=1)
  after, _ = hf.load_hf_encoder(tmp_path, params={"params": before},
                                config=config_lib.get_config("tiny"))
  old, new = _paths(before), _paths(after["params"])
  assert old.keys() == new.keys()
  changed = {k for k in old if not np.array_equal(old[k], new[k])}
  assert changed and all(k.startswith(("['shared_embedding']", "['encoder']")) for k in changed)
  assert not any("pooler" in k or "align_head" in k for k in changed)
  assert not any(k.startswith("['decoder']") for k in changed)
  g = _golden()
  states, _ = _encode(model_cfg, after["params"], g["input_ids"], g["attention_mask"],
                      g["token_type_ids"])
  assert _max_abs(states, g["last_hidden_state"]) < ATOL


def test_save_then_load_is_exact_and_leaves_the_rest(tmp_path):
  with open(os.path.join(FIXTURE, "config.json")) as f:
    model_cfg = _model_config(json.load(f))
  ours = _random_params(model_cfg, seed=2)
  out = hf.save_hf_encoder(ours, model_cfg, tmp_path / "export")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  assert exported["model_type"] == "albert" and exported["num_hidden_groups"] == 2
  other = _random_params(model_cfg, seed=3)
  back, back_cfg = hf.load_hf_encoder(out, params=other, config=model_cfg)
  assert ModelConfig.from_config(back_cfg) == ModelConfig.from_config(model_cfg)
  want, got, init = _paths(ours), _paths(back), _paths(other)
  for k in want:
    encoder_side = k.startswith("['shared_embedding']") or (
        k.startswith("['encoder']") and "align_head" not in k)
    np.testing.assert_array_equal(got[k], want[k] if encoder_side else init[k], err_msg=k)
  # Writing again over an existing directory replaces our files and keeps others.
  (tmp_path / "export" / "tokenizer.model").write_text("keep me")
  hf.save_hf_encoder(other, model_cfg, out)
  assert (tmp_path / "export" / "tokenizer.model").read_text() == "keep me"
  again, _ = hf.load_hf_encoder(out, params=ours, config=model_cfg)
  np.testing.assert_array_equal(_paths(again)["['encoder']['pooler']['kernel']"],
                                init["['encoder']['pooler']['kernel']"])


def test_load_errors_are_one_clear_sentence(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    hf.load_hf_encoder(tmp_path / "missing")
  shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="No model.safetensors"):
    hf.load_hf_encoder(tmp_path)
  weights = load_file(os.path.join(FIXTURE, "model.safetensors"))
  key = "encoder.albert_layer_groups.1.albert_layers.0.ffn.weight"
  weights[key] = weights[key][:, :-1].copy()
  save_file(weights, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=f"{key} .* has shape \\(48, 31\\)"):
    hf.load_hf_encoder(tmp_path)
  # A pre-LayerNorm model is no HF ALBERT: neither loaded into nor written as one.
  save_file(load_file(os.path.join(FIXTURE, "model.safetensors")),
            str(tmp_path / "model.safetensors"))
  pre = config_lib.get_config("tiny")
  pre.model.norm_position = "pre"
  with pytest.raises(ValueError, match="norm_position='pre'.*use norm_position='post'"):
    hf.load_hf_encoder(tmp_path, config=pre)
  with pytest.raises(ValueError, match="norm_position='pre'"):
    hf.save_hf_encoder({}, pre, tmp_path / "out")
  assert not (tmp_path / "out").exists()
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ValueError, match="torch is not installed; convert it to model.safetensors"):
    hf.load_hf_encoder(tmp_path)


# ---------------------------------------------------------------------------------------------
# LIVE: transformers.AlbertModel in PyTorch.

LIVE_CONFIGS = {
    "one_group": dict(num_hidden_layers=3),
    "2groups_x_2inner": dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2),
    "gelu_exact": dict(num_hidden_layers=2, inner_group_num=2, hidden_act="gelu"),
}


def _albert(torch, seed: int, **overrides):
  import transformers  # pylint: disable=g-import-not-at-top
  config = dict(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=24, hidden_act="gelu_new")
  config.update(overrides)
  torch.manual_seed(seed)
  model = transformers.AlbertModel(transformers.AlbertConfig(**config)).eval()
  with torch.no_grad():  # random biases and LayerNorms too, so every mapping is exercised
    for name, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("orm.weight")
              else 0.2 * torch.randn_like(p))
  return model


def _torch_outputs(torch, model, g):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(g["input_ids"]),
                attention_mask=torch.tensor(g["attention_mask"]),
                token_type_ids=torch.tensor(g["token_type_ids"]))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("name", sorted(LIVE_CONFIGS))
def test_live_parity_with_transformers(name, tmp_path):
  torch = pytest.importorskip("torch")
  model = _albert(torch, seed=len(name), **LIVE_CONFIGS[name])
  model.save_pretrained(tmp_path, safe_serialization=True)
  g = _golden()  # a padded batch: full row, right-padded row, row with a masked hole
  want_s, want_p = _torch_outputs(torch, model, g)
  model_cfg = _model_config(model.config.to_dict())
  params, loaded_cfg = hf.load_hf_encoder(tmp_path, params=_random_params(model_cfg),
                                          config=config_lib.get_config("tiny"))
  assert ModelConfig.from_config(loaded_cfg) == ModelConfig.from_config(model_cfg)
  states, pooled = _encode(model_cfg, params, g["input_ids"], g["attention_mask"],
                           g["token_type_ids"])
  err_s, err_p = _max_abs(states, want_s), _max_abs(pooled, want_p)
  print(f"\nlive parity {name}: last_hidden_state {err_s:.2e}, pooler_output {err_p:.2e}")
  assert err_s < ATOL and err_p < ATOL


def test_live_round_trip_our_encoder_to_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  model_cfg = _model_config(dict(vocab_size=100, embedding_size=16, hidden_size=32,
                                 num_attention_heads=4, intermediate_size=48,
                                 num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2,
                                 hidden_act="gelu_new", max_position_embeddings=24))
  ours = _random_params(model_cfg, seed=4)
  hf.save_hf_encoder(ours, model_cfg, tmp_path / "ours")
  model, info = transformers.AlbertModel.from_pretrained(tmp_path / "ours",
                                                         output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  g = _golden()
  want_s, want_p = _torch_outputs(torch, model.eval(), g)
  states, pooled = _encode(model_cfg, ours, g["input_ids"], g["attention_mask"],
                           g["token_type_ids"])
  err_s, err_p = _max_abs(states, want_s), _max_abs(pooled, want_p)
  print(f"\nround trip ours -> HF: last_hidden_state {err_s:.2e}, pooler_output {err_p:.2e}")
  assert err_s < ATOL and err_p < ATOL
