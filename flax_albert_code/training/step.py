"""The pure, jitted training and evaluation steps, and sharded state creation.

Per-step randomness is `fold_in(state.rng, state.step)`; the train step donates the state.
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax_albert_code.training import losses
from flax_albert_code.model import sharding
from flax_albert_code.config import PAD_ID
from flax_albert_code.model.albert import CodeModel

log = logging.getLogger("flax_albert_code")
Array = jax.Array
STAGES = ("pretrain", "finetune", "joint")
# The InfoNCE temperature at init (CLIP's); training learns its log inverse.
INIT_TEMPERATURE = 0.07


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any        # {"model": CodeModel params, "log_inv_temp": InfoNCE temperature}
  opt_state: Any
  rng: Array         # raw uint32[2] key, checkpointable


def objectives(train_cfg) -> tuple[bool, tuple[str, ...]]:
  """(generation on?, alignment losses) for the configured stage."""
  if train_cfg.stage not in STAGES:
    raise ValueError(f"config.train.stage={train_cfg.stage!r} is not one of {STAGES}.")
  align = tuple(a.strip() for a in train_cfg.align_losses.split(",") if a.strip())
  bad = [a for a in align if a not in ("l2", "infonce")]
  if bad:
    raise ValueError(f"config.train.align_losses has unknown {bad}; use a subset of l2,infonce.")
  if train_cfg.stage == "pretrain" and not align:
    raise ValueError("Stage 'pretrain' trains alignment only, but config.train.align_losses is "
                     "empty; set it to l2, infonce or both.")
  return train_cfg.stage != "pretrain", align


def retrieval_k(config) -> int:
  """Neighbours per description (0: the plain model; configs saved before retrieval have none)."""
  return int(config.retrieval.k) if "retrieval" in config else 0


def make_init(model: CodeModel, tx: optax.GradientTransformation, config) -> Callable:
  desc, code = (np.full((2, n), 7, np.int32)
                for n in (config.data.max_desc_len, config.data.max_code_len))

  def init(rng: Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = {"model": model.init(init_rng, desc, code)["params"],
              "log_inv_temp": jnp.log(1.0 / INIT_TEMPERATURE).astype(jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)
  return init


def create_state(model, tx, config, mesh, rng) -> tuple[TrainState, Any]:
  """(state, its shardings), the state born sharded: nothing full-size on one device."""
  _, shardings = abstract_state(model, tx, config, mesh)
  init = make_init(model, tx, config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config)):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(model, tx, config, mesh) -> tuple[TrainState, Any]:
  """Shapes, dtypes and shardings of the state without allocating it (for restores)."""
  init = make_init(model, tx, config)
  rules = sharding.rules(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def _output_weights(model_params, cfg):
  emb = model_params["shared_embedding" if cfg.share_embedding else "decoder_embedding"]
  return (emb["embedding_hidden_mapping_in"]["kernel"], emb["word_embeddings"]["embedding"],
          model_params["decoder"]["logits_bias"])


def compute_losses(params, batch, rng, *, model: CodeModel, config, train: bool):
  """Weighted total loss and metrics for one batch. With a `labelled` field [B] (an unlabelled
  schedule) the generation loss is over all rows, reported as gen_* (pairs) and denoise_*
  (unlabelled code); alignment reads the labelled rows only."""
  tc, mc = config.train, model.cfg
  gen, align = objectives(tc)
  dropout = train and mc.hidden_dropout_prob > 0
  desc, code = batch["desc_ids"], batch["code_ids"]
  labelled = batch.get("labelled")
  out = model.apply({"params": params["model"]}, desc, code, deterministic=not dropout,
                    encode_code=bool(align), decode=gen, ctx_ids_BxC=batch.get("ctx_ids"),
                    rngs={"dropout": rng})
  metrics, total = {}, 0.0
  if gen:
    sums = losses.generation_row_sums(
        out["hidden"], code, code != PAD_ID, *_output_weights(params["model"], mc),
        copy=out.get("copy"), chunk=tc.loss_chunk, logits_dtype=tc.logits_dtype)
    ce, acc, count = losses.group_mean(*sums)
    total += ce
    if labelled is None:
      metrics.update(gen_loss=ce, token_accuracy=acc, code_tokens=count)
    else:   # 0 for a kind the batch has no rows of
      pair_ce, pair_acc, _ = losses.group_mean(*sums, labelled)
      dn_ce, dn_acc, _ = losses.group_mean(*sums, ~labelled)
      metrics.update(gen_loss=pair_ce, token_accuracy=pair_acc, denoise_loss=dn_ce,
                     denoise_accuracy=dn_acc, code_tokens=count)
  if align:
    v_d, v_c = out["desc"].vector_BxA, out["code"].vector_BxA
    if "l2" in align:
      l2 = losses.l2_alignment(v_d, v_c, labelled)
      total += tc.l2_weight * l2
      metrics["l2_loss"] = l2
    if "infonce" in align:
      nce = losses.infonce(v_d, v_c, params["log_inv_temp"], labelled)
      total += tc.infonce_weight * nce
      metrics.update(infonce_loss=nce, temperature=jnp.exp(-params["log_inv_temp"]))
    metrics["retrieval_accuracy"] = losses.retrieval_accuracy(v_d, v_c, labelled)
  metrics["loss"] = total
  return total, metrics


def train_step(state: TrainState, batch, *, model: CodeModel, tx,
               config) -> tuple[TrainState, dict]:
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(
      functools.partial(compute_losses, model=model, config=config, train=True), has_aux=True)
  n_micro = int(config.train.microbatches)
  if n_micro <= 1:
    (_, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    micro_batches = jax.tree.map(
        lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

    def micro(carry, mb_i):
      mb, i = mb_i
      (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (g, m)), None
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (_, m0), g0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               jax.eval_shape(grad_fn, state.params, first, rng))
    (g_sum, m_sum), _ = jax.lax.scan(micro, (g0, m0), (micro_batches, jnp.arange(n_micro)))
    grads = jax.tree.map(lambda g: g / n_micro, g_sum)
    metrics = jax.tree.map(lambda m: m / n_micro, m_sum)
    if "code_tokens" in metrics:
      metrics["code_tokens"] = m_sum["code_tokens"]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["param_norm"] = optax.tree.norm(params)   # the trainer's NaN guard checks it too
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model: CodeModel, config) -> dict:
  _, metrics = compute_losses(params, batch, jax.random.PRNGKey(0), model=model, config=config,
                              train=False)
  return metrics


def jit_steps(model, tx, config, mesh, state_shardings):
  """The jitted train and eval steps with explicit shardings (call under `jax.set_mesh`)."""
  rules = sharding.rules(config)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

  def with_rules(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with nn.logical_axis_rules(rules):
        return fn(*args)
    return wrapped
  train = jax.jit(with_rules(functools.partial(train_step, model=model, tx=tx, config=config)),
                  in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, repl),
                  donate_argnums=0)
  evaluate = jax.jit(with_rules(functools.partial(eval_step, model=model, config=config)),
                     in_shardings=(state_shardings.params, batch_sh), out_shardings=repl)
  return train, evaluate


def program_key(kind: str, batch) -> tuple:
  """What picks a step's compiled program: train or eval, the code bucket, the batch's fields."""
  return kind, batch["code_ids"].shape[1], tuple(sorted(batch))


def precompile(train_fn, eval_fn, state: TrainState, config, mesh,
               code_lengths) -> dict[tuple, Any]:
  """{`program_key`: compiled step} for every code bucket, compiled side by side in threads."""
  start = time.perf_counter()
  futures = precompile_async(train_fn, eval_fn, state, config, mesh, code_lengths)
  compiled = {k: f.result() for k, f in futures.items()}
  log.info("Compiled %d step programs in %.1f s.", len(compiled), time.perf_counter() - start)
  return compiled


def precompile_async(train_fn, eval_fn, state: TrainState, config, mesh, code_lengths,
                     first: tuple | None = None
                     ) -> dict[tuple, concurrent.futures.Future]:
  """`precompile` without waiting: {key: Future of the compiled step}. One thread traces and
  lowers the programs in turn (tracing holds the GIL), `first` first, then train, then eval;
  each compiles in its own thread. A restart from the cache then waits for one trace."""
  def batch(lc, labelled=False):   # eval batches have the train batch's rows, never `labelled`
    shape = lambda *s, dtype=jnp.int32: jax.ShapeDtypeStruct(
        (config.train.batch_size, *s), dtype, sharding=sharding.batch_sharding(mesh))
    out = {"desc_ids": shape(config.data.max_desc_len), "code_ids": shape(lc)}
    if retrieval_k(config):
      out["ctx_ids"] = shape(int(config.retrieval.max_ctx_len))
    if labelled:
      out["labelled"] = shape(dtype=jnp.bool_)
    return out

  # Shapes only: the live state may be donated by training steps while this runs.
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                       state)
  jobs = {}
  for lc in code_lengths:
    b = batch(lc, bool(config.train.unlabelled_schedule))
    jobs[program_key("train", b)] = (train_fn, (state, b))
    if eval_fn is not None:
      jobs[program_key("eval", batch(lc))] = (eval_fn, (state.params, batch(lc)))
  order = sorted(jobs, key=lambda k: (k != first, k[0] != "train", k[1]))
  futures = {k: concurrent.futures.Future() for k in order}
  pool = concurrent.futures.ThreadPoolExecutor(len(order))

  def compile_into(key, low):
    try:
      futures[key].set_result(low.compile())
    except BaseException as e:  # noqa: BLE001 - handed to whoever waits for this program
      futures[key].set_exception(e)

  def lower_all():
    with jax.set_mesh(mesh):
      for i, key in enumerate(order):
        fn, args = jobs[key]
        try:
          low = fn.lower(*args)
        except BaseException as e:  # noqa: BLE001
          for k in order[i:]:
            futures[k].set_exception(e)
          return
        pool.submit(compile_into, key, low)
    pool.shutdown(wait=False)

  threading.Thread(target=lower_all, name="precompile", daemon=True).start()
  return futures
