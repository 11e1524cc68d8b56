"""CodeGenerator: descriptions -> ranked code candidates; texts -> alignment vectors. Batches
are padded to `config.sample.batch_buckets`, so calls reuse one program per bucket and options."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flax_albert_code import config as config_lib
from flax_albert_code.data import prepared as prepared_lib
from flax_albert_code.inference import decoding, memory, model_decoding, options, postprocess
from flax_albert_code.model import albert as model_lib, checkpoint_io, sharding
from flax_albert_code.retrieval import index as index_lib, retriever as retriever_lib
from flax_albert_code.model.layers import ModelConfig
from flax_albert_code.tokenizer import Tokenizer, frame_context

log = logging.getLogger(__name__)


def full_config(config) -> ml_collections.ConfigDict:
  """A whole config from a whole config, its `model` section or a ModelConfig."""
  if hasattr(config, "model") and hasattr(config, "sample"):
    if "retrieval" in config:
      return config
    c = ml_collections.ConfigDict(config.to_dict())   # saved before retrieval existed
    c.retrieval = config_lib.get_config().retrieval
    return c
  c = config_lib.get_config()
  c.model.update(dataclasses.asdict(config) if isinstance(config, ModelConfig) else dict(config))
  return c


def inference_params(params, compute_dtype) -> Any:
  """Unboxed variables, matrices in the compute dtype (layers cast them anyway): half the memory."""
  params = nn.meta.unbox(params)
  variables = params if "params" in params else {"params": params}
  return jax.tree.map(lambda x: jnp.asarray(x).astype(compute_dtype)
                      if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                      variables)


@functools.partial(jax.jit, static_argnames=("model", "mesh", "axis_rules"))
def _vectors(model, variables, ids_BxL, *, mesh, axis_rules):
  with model_decoding.mesh_context(mesh, axis_rules):
    vec = model.apply(variables, ids_BxL, method=model_lib.CodeModel.encode).vector_BxA
  return vec / jnp.maximum(jnp.linalg.norm(vec, axis=-1, keepdims=True), 1e-6)


class CodeGenerator:
  """Generation, reranking and embedding with one model's parameters."""

  def __init__(self, config, params, tokenizer, prepared=None,
               mesh: jax.sharding.Mesh | None = None):
    self.config = full_config(config)
    self.model, self.cfg = model_lib.build(self.config)
    self.tokenizer, self.prepared, self.mesh = tokenizer, prepared, mesh
    self.axis_rules = sharding.rules(self.config) if mesh is not None else None
    self.max_desc_len = int(self.config.data.max_desc_len)
    limit = self.cfg.max_position_embeddings
    self.code_buckets = sorted({min(int(b), limit) for b in self.config.data.code_buckets})
    self.default_max_new_tokens = min(int(self.config.sample.max_new_tokens), limit)
    # Configs saved before the field existed decode with the default.
    self.decode_phase = int(self.config.sample.get("decode_phase", 64))
    self._divisor = sharding.batch_divisor(mesh) if mesh is not None else 1
    self.batch_buckets = memory.buckets(self.config, self._divisor)
    model_lib.check_params(self.model, nn.meta.unbox(params))
    self.variables = self._place(params)
    self.step: int | None = None
    self.checkpoint_path: str | None = None
    self.retrieval_k = int(self.config.retrieval.k)
    self.max_ctx_len = int(self.config.retrieval.max_ctx_len)
    self._corpus: tuple[str, Any] | None = None   # (spec, Retriever over its index)
    # A warning for each description cut to max_desc_len; off where a caller summarises them.
    self.warn_long = True

  @classmethod
  def from_checkpoint(cls, path: str, *, mesh: jax.sharding.Mesh | None = None) -> CodeGenerator:
    """From a workdir (its latest checkpoint) or a checkpoint step directory."""
    config, params, step = checkpoint_io.load_for_inference(path)
    directory, _ = checkpoint_io.resolve(path)
    prepared = _find_prepared(config, os.fspath(directory.parent))
    if prepared is not None:
      tokenizer = prepared.tokenizer
    elif config.data.get("tokenizer_path"):
      tokenizer = Tokenizer.load(os.path.expanduser(config.data.tokenizer_path))
    else:
      raise ValueError(f"No prepared data (and so no tokenizer) found for the checkpoint {path}; "
                       "keep the run's data/ directory beside its checkpoints or set "
                       "config.data.data_dir.")
    gen = cls(config, params, tokenizer, prepared=prepared, mesh=mesh)
    gen.step, gen.checkpoint_path = step, os.fspath(directory / str(step))
    return gen

  def generate(self, descriptions: Sequence[str], strategy: str = "greedy", num_samples: int = 1,
               num_beams: int = 4, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               rerank: bool = False, max_new_tokens: int | None = None, seed: int = 0,
               length_penalty: float = 1.0, repetition_penalty: float | None = None,
               no_repeat_ngram_size: int | None = None,
               drop_unparsable: bool = False, retrieve: bool | None = None,
               corpus: str | None = None) -> list[list[dict[str, Any]]]:
    """Per description, candidates best first: {"code", "score", "align", "parses",
    "finish_reason"} (and "neighbours" with retrieval). Penalties None take config.sample's;
    sample j of description i draws with `options.candidate_keys(seed, [i], ...)`. A model
    trained with retrieval retrieves from `corpus` (None: its train split) unless not `retrieve`."""
    texts = postprocess.check_texts(descriptions, "Description")
    max_new = self.default_max_new_tokens if max_new_tokens is None else max_new_tokens
    sc = self.config.sample
    if repetition_penalty is None:
      repetition_penalty = float(sc.get("repetition_penalty", 1.0))
    if no_repeat_ngram_size is None:
      no_repeat_ngram_size = int(sc.get("no_repeat_ngram_size", 0))
    options.check(strategies=decoding.STRATEGIES, strategy=strategy, max_new_tokens=max_new,
                  num_beams=num_beams, num_samples=num_samples, top_k=top_k, top_p=top_p,
                  temperature=temperature, length_penalty=length_penalty,
                  repetition_penalty=repetition_penalty, seed=seed,
                  max_tokens=self.cfg.max_position_embeddings, vocab_size=self.cfg.vocab_size,
                  no_repeat_ngram_size=no_repeat_ngram_size)
    max_new = int(max_new)
    memory.check(self.config, num_texts=len(texts), strategy=strategy, num_samples=num_samples,
                 num_beams=num_beams, max_new_tokens=max_new, divisor=self._divisor)
    if not texts:
      return []
    used = postprocess.retrieves(retrieve, self.retrieval_k, "drop retrieve/--corpus or train "
                                 "with --config.retrieval.k=2.")
    neighbours = self.retrieve(texts, corpus) if used else [[] for _ in texts]
    width = self.max_ctx_len if used else self.max_desc_len
    ids = np.array([postprocess.pad(self._input_ids(t, i, [n["tokens"] for n in neighbours[i]]),
                                    width) for i, t in enumerate(texts)], np.int32)
    k = decoding.num_candidates(strategy, num_beams, num_samples)
    keys = options.candidate_keys(seed, range(len(texts)), k) if strategy == "sample" else None
    tokens, scores = [], []
    for start, size, bucket in postprocess.chunks(len(texts), self.batch_buckets):
      batch = np.zeros((bucket, width), np.int32)
      batch[:size] = ids[start:start + size]
      rng = jax.random.PRNGKey(0)                  # unused by greedy and beam search
      if keys is not None:
        rng = np.zeros((bucket, k, 2), np.uint32)
        rng[:size] = keys[start:start + size]
        rng = self._put(rng)
      t, s = model_decoding.generate(
          self.model, self.variables, self._put(batch), strategy=strategy, max_new_tokens=max_new,
          rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
          length_penalty=length_penalty, num_samples=num_samples, decode_phase=self.decode_phase,
          mesh=self.mesh, axis_rules=self.axis_rules, repetition_penalty=repetition_penalty,
          no_repeat_ngram_size=no_repeat_ngram_size)
      tokens.append(np.asarray(jax.device_get(t))[:size])
      scores.append(np.asarray(jax.device_get(s))[:size])
    results = postprocess.candidates(self.tokenizer.decode, np.concatenate(tokens),
                                     np.concatenate(scores), neighbours if used else None)
    return postprocess.rank(results, texts, self.embed, rerank=rerank,
                            drop_unparsable=drop_unparsable, keep=num_samples)

  def retrieve(self, texts: Sequence[str], corpus: str | None = None, k: int | None = None,
               method: str | None = None) -> list[list[dict[str, Any]]]:
    """Per description, the `k` nearest functions of `corpus` by `method`, best first."""
    retriever, items = self.retriever(corpus)
    k = self.retrieval_k if k is None else int(k)
    method = method or self.config.retrieval.method
    return retriever_lib.neighbours(retriever, items, texts, k, method, self.embed,
                                    self.tokenizer.encode)

  def retriever(self, corpus: str | None = None):
    """(Retriever, items) over `corpus`'s index, built once and saved under search_index/."""
    spec = corpus or "prepared:train"
    if self._corpus is None or self._corpus[0] != spec:
      examples, fingerprint, _ = index_lib.corpus(spec, self.prepared)
      if not examples:
        raise ValueError(f"The retrieval corpus {spec} holds no functions; name another with "
                         "--corpus (e.g. dir:PATH) or pass --no-retrieve.")
      if self.checkpoint_path:
        index = index_lib.load_or_build(self, examples, fingerprint, index_lib.default_root(self))
        vectors, items = index.vectors, index.items
      else:
        vectors, items = index_lib.build_index(self, examples), examples
      self._corpus = (spec, (retriever_lib.over_items(items, vectors), items))
    return self._corpus[1]

  def embed(self, texts: Sequence[str], kind: str = "desc") -> np.ndarray:
    """L2-normalised alignment vectors [N, align_dim] of descriptions or code."""
    ids, widths = postprocess.embed_ids(texts, kind, self.tokenizer, self.max_desc_len,
                                        self.code_buckets, self._description_ids)

    def encode(batch, bucket, width):
      del bucket, width
      return jax.device_get(_vectors(self.model, self.variables, self._put(batch),
                                     mesh=self.mesh, axis_rules=self.axis_rules))
    return postprocess.vectors_by_width(ids, widths, self.batch_buckets, self.cfg.align_dim, encode)

  def _input_ids(self, text: str, i: int, neighbour_tokens: list[list[int]]) -> list[int]:
    """The framed description, or with neighbours its retrieval context (as training's)."""
    if not neighbour_tokens:
      return self._description_ids(text, i)
    return frame_context(self.tokenizer.encode(text), neighbour_tokens, self.max_desc_len,
                         self.max_ctx_len)

  def long_descriptions(self, texts: Sequence[str]) -> list[int]:
    """Indices of the `texts` longer than the model reads (max_desc_len - 2 tokens)."""
    return [i for i, t in enumerate(texts)
            if len(self.tokenizer.encode(t)) > self.max_desc_len - 2]

  def _description_ids(self, text: str, i: int) -> list[int]:
    n = len(self.tokenizer.encode(text))
    if n > self.max_desc_len - 2 and self.warn_long:
      log.warning("Description %d is %d tokens long; the model reads at most %d, so it was "
                  "truncated.", i + 1, n, self.max_desc_len - 2)
    return self.tokenizer.encode_description(text, self.max_desc_len)

  def _put(self, batch: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(batch)
    return jax.device_put(batch, sharding.batch_sharding(self.mesh))

  def _place(self, params) -> Any:
    variables = inference_params(params, self.cfg.compute_dtype)
    if self.mesh is None:
      return variables
    dummy = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), dummy, dummy)
    shardings = sharding.logical_shardings(abstract, self.mesh, self.axis_rules)
    return jax.device_put(variables, shardings)


def _find_prepared(config, workdir: str):
  """The run's prepared data (for its tokenizer), or None."""
  candidates = [config.data.get("data_dir") or "", workdir]
  if "://" in workdir:  # a gs:// run prepared its data on the local disk (prepared.data_root)
    candidates.append(prepared_lib.REMOTE_WORKDIR_DATA)
  for path in filter(None, candidates):
    try:
      return prepared_lib.load_prepared(path, config.data)
    except (prepared_lib.DataError, OSError, ValueError):
      continue
  return None
