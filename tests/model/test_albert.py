"""Properties of CodeModel on the `tiny` preset, fp32 on CPU: padding, causality, cached
decoding, depth-independent parameters and compile time, scan/remat equivalence, sharding."""
from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_albert_code import config as config_lib
from flax_albert_code.model import sharding
from flax_albert_code.model import albert as model_lib
from flax_albert_code.model import fused_decode
from flax_albert_code.inference import model_decoding
from flax_albert_code.config import EOS_ID, PAD_ID

B, L, T = 2, 6, 7  # batch, description length, code length (tiny shapes keep compiles short)
# XLA:CPU compiles 3-5x faster without its backend optimisations; these tests are compile bound.
FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_jit = functools.partial(jax.jit, compiler_options=FAST_CPU)


def _config(**model_overrides):
  config = config_lib.get_config("tiny")
  config.model.update(model_overrides)
  return config


def _model(**model_overrides) -> model_lib.CodeModel:
  return model_lib.build(_config(**model_overrides))[0]


def _batch(seed: int = 0, b: int = B) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded descriptions and code framed as the tokenizer does (tokens, EOS, padding);
  the first row of each fills its length."""
  rs = np.random.RandomState(seed)
  desc = rs.randint(6, 512, (b, L)).astype(np.int32)
  code = rs.randint(6, 512, (b, T)).astype(np.int32)
  for i in range(b):
    n_desc, n_code = (L, T) if i == 0 else (rs.randint(2, L), rs.randint(2, T))
    desc[i, n_desc:] = PAD_ID
    code[i, n_code - 1] = EOS_ID
    code[i, n_code:] = PAD_ID
  return desc, code


def random_params(model: model_lib.CodeModel, seed: int = 0) -> dict:
  """Parameters drawn with numpy (no init compile): normal(0.2) weights and biases, LayerNorm
  scales near 1, so every tensor, bias included, matters to the outputs."""
  desc, code = _batch()
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), desc, code)["params"])
  rs = np.random.RandomState(seed)

  def draw(path, leaf):
    x = rs.normal(0.0, 0.2 if path[-1].key != "scale" else 0.1, leaf.shape)
    return jnp.asarray(x + (path[-1].key == "scale"), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _pad(x: np.ndarray, extra: int) -> np.ndarray:
  return np.pad(x, ((0, 0), (0, extra)), constant_values=PAD_ID)


def _assert_close(a, b, atol: float, what: str = ""):
  err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  desc, code = _batch()
  return model, random_params(model), desc, code


@pytest.mark.parametrize("pooling,norm", [("cls", "post"), ("mean", "post"),
                                          ("first_last", "pre")])
def test_extra_padding_changes_nothing_at_real_positions(pooling, norm):
  model = _model(pooling=pooling, norm_position=norm)
  desc, code = _batch()
  params = random_params(model)
  fwd = _jit(lambda p, d, c: model.apply({"params": p}, d, c))
  out = fwd(params, desc, code)
  out_pad = fwd(params, _pad(desc, 5), _pad(code, 3))
  for key in ("desc", "code"):
    a, b = out[key], out_pad[key]
    n = a.states_BxLxH.shape[1]
    mask = np.asarray(a.mask_BxL)[..., None]
    _assert_close(a.states_BxLxH * mask, b.states_BxLxH[:, :n] * mask, 1e-5, f"{key} states")
    _assert_close(a.pooled_BxH, b.pooled_BxH, 1e-5, f"{key} pooled")
    _assert_close(a.vector_BxA, b.vector_BxA, 1e-5, f"{key} vector")
  code_mask = (code != PAD_ID)[..., None]
  _assert_close(out["hidden"] * code_mask, out_pad["hidden"][:, :T] * code_mask, 1e-5,
                "decoder hidden")
  # Not vacuous: a real token in a padded (or EOS) slot does change the encodings.
  desc2, code2 = desc.copy(), code.copy()
  desc2[1, -1] = 9
  code2[1, np.argmax(code[1] == EOS_ID)] = 9
  assert desc[1, -1] == PAD_ID
  out2 = fwd(params, desc2, code2)
  assert np.abs(out2["desc"].pooled_BxH - out["desc"].pooled_BxH).max() > 1e-3
  assert np.abs(out2["code"].pooled_BxH - out["code"].pooled_BxH).max() > 1e-3


def _logits_from_embedded(module: model_lib.CodeModel, x_BxTxH, enc):
  """Decoder logits from an already embedded input, so we can differentiate w.r.t. it."""
  memory, lengths = module._memory(enc)  # pylint: disable=protected-access
  h, _ = module.decoder.train_stacks[0](x_BxTxH, module.decoder.memory_kv(memory), lengths)
  return module.logits(h)


def test_decoder_is_causal(tiny):
  model, params, desc, code = tiny
  variables = {"params": params}

  @_jit
  def jacobian(desc, dec_in):
    enc = model.apply(variables, desc, method="encode")
    x = model.apply(variables, dec_in, method=lambda m, ids: m.shared_embedding(ids))
    f = lambda x: model.apply(variables, x, enc, method=_logits_from_embedded)[0]
    return jax.jacrev(f)(x)                            # [T, V, 1, T, H]

  jac = jacobian(desc[:1], model_lib.shift_right(code[:1], config_lib.BOS_ID))
  norms = np.asarray(jnp.abs(jac).sum(axis=(1, 2, 4)))  # [T out, T in]
  future = np.triu(np.ones((T, T), bool), k=1)
  assert norms[future].max() == 0.0, f"logits depend on later tokens:\n{norms}"
  assert norms[~future].min() > 1e-6, f"logits ignore earlier tokens:\n{norms}"


@pytest.mark.parametrize("memory,share_block,share_emb,norm,decode", [
    ("states", False, True, "post", "xla"), ("vector", True, False, "post", "xla"),
    ("states", True, False, "post", "xla"), ("states", False, True, "pre", "xla"),
    # The one-token layer as model/fused_decode.py's kernels (Pallas' interpreter on CPU):
    # LayerNorms folded into the projections (post-norm: a LayerNorm pending between layers).
    # Blocks of 2 cache positions: the write kernel's online softmax runs over several.
    ("states", False, True, "post", "layer"), ("vector", True, False, "pre", "layer/2")])
def test_cached_decoding_equals_teacher_forcing(memory, share_block, share_emb, norm, decode,
                                                monkeypatch):
  if decode.endswith("/2"):
    monkeypatch.setattr(fused_decode, "_BLOCK", 2)
  model = _model(decoder_memory=memory, share_encoder_decoder_block=share_block,
                 share_embedding=share_emb, norm_position=norm,
                 decode_attention=decode.split("/")[0])
  desc, code = _batch(1)
  variables = {"params": random_params(model)}
  dec_in = model_lib.shift_right(code, config_lib.BOS_ID)

  @_jit
  def full_and_cache(desc, dec_in):
    enc = model.apply(variables, desc, method="encode")
    logits = model.apply(variables, enc, dec_in, method="decode_logits")
    return logits, model.apply(variables, enc, T, method="init_cache")

  want, cache = full_and_cache(desc, dec_in)
  step = _jit(lambda ids, c, n: model.apply(variables, ids, c, n, method="decode_step"),
              static_argnums=2)
  # A few tokens at once over the whole cache, then one at a time in decoding phases that
  # attend to the first 4, 6, then all 7 positions.
  got, prefix = [], 3
  logits, cache = step(dec_in[:, :prefix], cache, None)
  got.append(logits)
  for t in range(prefix, T):
    logits, cache = step(dec_in[:, t:t + 1], cache, 4 if t < 4 else 6 if t < 6 else None)
    got.append(logits)
  assert int(cache.index) == T
  _assert_close(jnp.concatenate(got, axis=1), want, 1e-5, "cached vs teacher-forced logits")


@pytest.mark.parametrize("beams", [1, 2], ids=["greedy", "beam"])
@pytest.mark.parametrize("decode", ["xla", "layer"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_decode_matrix_cached_steps_equal_teacher_forced_xla(norm, scan, decode, beams):
  """Every way a one-token step can run: LayerNorm position x scanned or unrolled depth x XLA
  or the layer kernels (Pallas' interpreter on CPU) x one row per description or beams reading
  the cache through their index (reordered halfway). Each step's output equals the
  teacher-forced XLA logits of the row's prefix at that step."""
  model = _model(norm_position=norm, scan_layers=scan, decode_attention=decode)
  desc, _ = _batch(3)
  variables = {"params": random_params(model)}
  n, steps, cut = B * beams, 5, 2
  rs = np.random.RandomState(4)
  before = rs.randint(6, 512, (n, steps)).astype(np.int32)
  before[:, 0] = config_lib.BOS_ID
  # Halfway, beam k of each description continues beam parent[k] (one dropped, one doubled).
  parent = np.array([[1, 1]] * B if beams > 1 else [[0]] * B)
  rows = (np.arange(B)[:, None] * beams + parent).reshape(-1)
  after = np.concatenate([before[rows, :cut], rs.randint(6, 512, (n, steps - cut))], axis=1)
  after = after.astype(np.int32)

  @_jit
  def reference(desc, before, after):
    enc = model.apply(variables, desc, method="encode")
    tiled = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), enc)
    logits = [model.apply(variables, tiled, ids, method="decode_logits")
              for ids in (before, after)]
    cache = model.apply(variables, enc, steps, beams, beams > 1, method="init_cache")
    return logits, cache

  (want_before, want_after), cache = reference(desc, before, after)
  step = _jit(lambda ids, c: model.apply(variables, ids, c, method="decode_step"))
  for t in range(steps):
    if t == cut and beams > 1:
      cache = model_decoding.reorder_decode_cache(cache, jnp.asarray(parent))
    ids, want = (before, want_before) if t < cut else (after, want_after)
    got, cache = step(ids[:, t:t + 1], cache)
    _assert_close(got[:, 0], want[:, t], 1e-5, f"step {t}")


def test_pre_norm_layout():
  """norm_position="pre": the same block parameters plus one final LayerNorm per stack, and
  LayerNorm before each sublayer: scaling a block's LayerNorm input by a constant changes
  nothing but the residual (the post-norm block normalises the sum instead)."""
  post, pre = _model(), _model(norm_position="pre")
  desc, code = _batch()
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nn.meta.unbox(
      jax.eval_shape(m.init, jax.random.key(0), desc, code)["params"]))
  p_post, p_pre = shapes(post), shapes(pre)
  assert set(p_pre["encoder"]) - set(p_post["encoder"]) == {"final_layer_norm"}
  assert set(p_pre["decoder"]) - set(p_post["decoder"]) == {"final_layer_norm"}
  strip = lambda t: {k: {kk: vv for kk, vv in v.items() if kk != "final_layer_norm"}
                     if isinstance(v, dict) else v for k, v in t.items()}
  assert strip(p_pre) == p_post
  with pytest.raises(ValueError, match="norm_position"):
    _model(norm_position="sandwich").init(jax.random.key(0), desc, code)
  params = random_params(pre)
  out = _jit(lambda p, d, c: pre.apply({"params": p}, d, c))(params, desc, code)
  assert np.isfinite(np.asarray(out["hidden"])).all()
  # The final LayerNorm is applied: with scale 1 and bias 0 the decoder output has zero mean
  # over features.
  final = params["decoder"]["final_layer_norm"]
  final["scale"], final["bias"] = jnp.ones_like(final["scale"]), jnp.zeros_like(final["bias"])
  out = _jit(lambda p, d, c: pre.apply({"params": p}, d, c))(params, desc, code)
  _assert_close(np.asarray(out["hidden"]).mean(-1), 0.0, 1e-4, "final LayerNorm mean")


def test_fused_projections_equal_separate_ones():
  """model.fused_qkv: one matmul against the stacked query|key|value kernels (a memory's
  key|value) gives what the separate projections give, from the same parameters: forward,
  gradient and cached decoding."""
  separate, fused = _model(fused_qkv=False), _model()
  assert fused.cfg.fused_qkv, "the fused projections are the default"
  params = random_params(separate)
  assert jax.tree.structure(random_params(fused)) == jax.tree.structure(params)
  desc, code = _batch()
  fwd = lambda m: jax.make_jaxpr(lambda p: m.apply({"params": p}, desc, code))(params)
  dots = lambda m: str(fwd(m)).count("dot_general")
  # Encoder Q|K|V 3 -> 1, decoder Q|K|V 3 -> 1, memory K|V 2 -> 1 (the code encoding too).
  assert dots(separate) - dots(fused) == 7, (dots(separate), dots(fused))

  run = lambda m: _jit(lambda p: m.apply({"params": p}, desc, code))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(run(fused)),
                          jax.tree.leaves(run(separate))):
    _assert_close(a, b, 1e-5, f"fused forward {jax.tree_util.keystr(path)}")
  grad = lambda m: _jit(jax.grad(_loss(m)))(params, desc, code)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad(fused)),
                          jax.tree.leaves(grad(separate))):
    _assert_close(a, b, 1e-5, f"fused gradient {jax.tree_util.keystr(path)}")

  def decode(m):
    variables = {"params": params}
    enc = m.apply(variables, desc, method="encode")
    cache = m.apply(variables, enc, T, method="init_cache")
    dec_in = model_lib.shift_right(code, config_lib.BOS_ID)
    first, cache = m.apply(variables, dec_in[:, :3], cache, method="decode_step")
    second, cache = m.apply(variables, dec_in[:, 3:4], cache, method="decode_step")
    return first, second, cache.k_LxBxSxNxD, cache.cross_v_BxMxNxD
  for a, b in zip(_jit(decode, static_argnums=0)(fused), _jit(decode, static_argnums=0)(separate)):
    _assert_close(a, b, 1e-5, "fused cached decoding")


def _param_count(**overrides) -> int:
  model = _model(**overrides)
  desc, code = _batch()
  shapes = jax.eval_shape(model.init, jax.random.key(0), desc, code)
  return model_lib.param_count(nn.meta.unbox(shapes))


def test_parameter_count_independent_of_depth():
  n2 = _param_count(num_hidden_layers=2, decoder_layers=2)
  n12 = _param_count(num_hidden_layers=12, decoder_layers=12)
  assert n2 == n12
  # Sanity: the count does see real structure (more groups -> more blocks).
  assert _param_count(num_hidden_layers=12, num_hidden_groups=2) > n12


def _loss(model: model_lib.CodeModel):
  """Generation CE plus a term on the sentence vector, through every shared stack."""
  def loss(params, desc, code):
    out = model.apply({"params": params}, desc, code, encode_code=False)
    logits = model.apply({"params": params}, out["hidden"], method="logits")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, code[..., None], -1)[..., 0]
    w = (code != PAD_ID).astype(jnp.float32)
    return (nll * w).sum() / w.sum() + jnp.sum(out["desc"].vector_BxA[:, 0])
  return loss


def test_unrolled_matches_scan_and_remat_keeps_gradient():
  groups = dict(num_hidden_layers=4, num_hidden_groups=2, decoder_layers=3)  # repeats of 2, 3
  ref_model = _model(**groups)
  params = random_params(ref_model)
  desc, code = _batch()
  fwd = lambda m: _jit(lambda p: m.apply({"params": p}, desc, code))
  ref_out = fwd(ref_model)(params)
  unrolled = _model(scan_layers=False, **groups)
  assert jax.tree.structure(random_params(unrolled)) == jax.tree.structure(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fwd(unrolled)(params)),
                          jax.tree.leaves(ref_out)):
    _assert_close(a, b, 1e-5, f"scan_layers=False output {jax.tree_util.keystr(path)}")

  grad = lambda m: _jit(jax.grad(_loss(m)))(params, desc, code)
  ref_grad = grad(ref_model)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad(_model(remat="full", **groups))),
                          jax.tree.leaves(ref_grad)):
    _assert_close(a, b, 1e-5, f"remat=full gradient {jax.tree_util.keystr(path)}")
  used = {k: v for k, v in ref_grad["encoder"].items()   # the pooler is unused under mean pooling
          if k != "pooler" or ref_model.cfg.pooling == "cls"}
  assert min(float(jnp.abs(g).max()) for g in jax.tree.leaves(used)) > 0


def _compile_seconds(depth: int) -> float:
  """Trace + compile of the full forward pass with default XLA options."""
  model = _model(num_hidden_layers=depth, decoder_layers=depth)
  desc, code = _batch()
  params = jax.eval_shape(lambda: random_params(model))
  start = time.perf_counter()
  jax.jit(lambda p, d, c: model.apply({"params": p}, d, c)).lower(params, desc, code).compile()
  return time.perf_counter() - start


def test_compile_time_flat_in_depth():
  _compile_seconds(3)  # warm up what all depths share (primitive rules, the compiler itself)
  t2 = _compile_seconds(2)
  t24 = _compile_seconds(24)
  print(f"\ncompile (forward, encoder + decoder): depth 2 {t2:.2f}s, depth 24 {t24:.2f}s, "
        f"ratio {t24 / t2:.2f}")
  assert t24 < 2.5 * max(t2, 0.5), (t2, t24)


def test_sharded_forward_matches_single_device():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; conftest.py sets XLA_FLAGS")
  config = _config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  model = model_lib.build(config)[0]
  desc, code = _batch(2, b=4)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  init = lambda rng: model.init(rng, desc, code)
  fwd = _jit(lambda v, d, c: model.apply(v, d, c))
  rng = jax.random.key(0, impl="unsafe_rbg")  # compiles faster than threefry
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(init, rng)
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    variables = _jit(init, out_shardings=shardings)(rng)
    batch = sharding.batch_sharding(mesh)
    out = fwd(variables, jax.device_put(desc, batch), jax.device_put(code, batch))
  params = variables["params"]
  word = params["shared_embedding"]["word_embeddings"]["embedding"].value
  layer = params["encoder"]["albert_layer_groups_0"]["albert_layers_0"]
  P = jax.sharding.PartitionSpec
  assert word.sharding.spec == P(("tensor", "fsdp"), None)   # FSDP shards the vocabulary too
  assert layer["attention"]["query"]["kernel"].value.sharding.spec == P("fsdp", "tensor", None)
  assert layer["ffn"]["ffn"]["kernel"].value.sharding.spec == P("fsdp", "tensor")
  assert out["hidden"].sharding.spec[0] == ("data", "fsdp")

  single = jax.device_put(jax.device_get(nn.meta.unbox(variables)), jax.devices()[0])
  ref = fwd(single, desc, code)
  assert ref["hidden"].sharding.num_devices == 1
  # fp32; sharded matmuls may sum in another order, so allow a few ulps of O(1) activations.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(ref)):
    _assert_close(a, b, 1e-5, f"sharded vs single device {jax.tree_util.keystr(path)}")


def test_a_vocabulary_the_mesh_does_not_divide_is_sharded_over_what_divides_it():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; conftest.py sets XLA_FLAGS")
  P = jax.sharding.PartitionSpec
  for fsdp, tensor in ((4, 2), (8, 1)):
    config = _config(vocab_size=510)   # a tokenizer's vocabulary: 510 = 2 x 255
    config.mesh.update(data=1, fsdp=fsdp, tensor=tensor)
    model = model_lib.build(config)[0]
    desc, code = _batch(2)
    rules = sharding.rules(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      abstract = jax.eval_shape(lambda r: model.init(r, desc, code), jax.random.PRNGKey(0))
      shardings = sharding.logical_shardings(abstract, mesh, rules)["params"]
    word = shardings["shared_embedding"]["word_embeddings"]["embedding"]
    assert word.spec == P("tensor", None), (fsdp, tensor, word.spec)   # fsdp dropped
    assert word.shard_shape((510, 16)) == (510 // tensor, 16)
    # Dimensions that divide keep their axes.
    ffn = shardings["encoder"]["albert_layer_groups_0"]["albert_layers_0"]["ffn"]
    assert ffn["ffn"]["kernel"].spec == P("fsdp", "tensor")
