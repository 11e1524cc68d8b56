"""Why does greedy output look the way it does? Teacher-forced diagnostics of one checkpoint on
one split (valid by default): how much the decoder uses its input, whether greedy decoding
agrees with the model's own teacher-forced argmax, and how long greedy outputs are.

  python benchmarks/check_generation.py --checkpoint runs/quality [--split valid] [--n 256]

Rows (per code token, the reference's tokens teacher-forced, EOS included):
- nll / accuracy with the input generation reads (description + retrieved neighbours), with the
  description alone, and with another example's input (shuffled). The gap between "as
  generated" and "shuffled" is what the input is worth to the decoder (the trainer's
  input_gap). With retrieval, also with the reference itself as first neighbour: can the
  decoder copy (the trainer's copy_gap)?
- self-consistency (only without an n-gram ban, which changes greedy's choices on purpose):
  greedy's tokens teacher-forced back through the decoder; the share of positions whose argmax
  is not greedy's token (bf16 ties aside, 0 unless decoding and training compute different
  functions).
- the same nll with XLA's attention in float32 (`--reference`), to catch a fused kernel that
  computes something else than the reference.
- greedy: BLEU, its brevity penalty, output/reference length, share ending in EOS, share whose
  first token is the reference's.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from flax_albert_code.config import BOS_ID, EOS_ID, PAD_ID
from flax_albert_code.evaluation import metrics
from flax_albert_code.inference import model_decoding, postprocess
from flax_albert_code.inference.generator import CodeGenerator
from flax_albert_code.model import albert as model_lib


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced_batch(model, variables, ctx_BxL, targets_BxT):
  enc = model.apply(variables, ctx_BxL, method=model_lib.CodeModel.encode)
  logits = model.apply(variables, enc, model_lib.shift_right(targets_BxT, BOS_ID),
                       method=model_lib.CodeModel.decode_logits).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  return (-jnp.take_along_axis(logp, targets_BxT[..., None], -1)[..., 0],
          jnp.argmax(logits, -1))


def teacher_forced(model, variables, ctx_NxL: np.ndarray, targets_NxT: np.ndarray,
                   batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Per-token nll [N, T] and argmax [N, T] of the decoder reading `ctx` with `targets` fed
  (one compiled program per model and shapes, shared by every input row)."""
  nll, arg = [], []
  for s in range(0, len(ctx_NxL), batch):
    c, t = ctx_NxL[s:s + batch], targets_NxT[s:s + batch]
    pad = batch - len(c)
    c, t = np.pad(c, ((0, pad), (0, 0))), np.pad(t, ((0, pad), (0, 0)))
    n, a = jax.device_get(_teacher_forced_batch(model, variables, jnp.asarray(c),
                                                jnp.asarray(t)))
    nll.append(n[:batch - pad])
    arg.append(a[:batch - pad])
  return np.concatenate(nll), np.concatenate(arg)


def token_stats(nll_NxT, argmax_NxT, targets_NxT) -> dict:
  w = targets_NxT != PAD_ID
  return {"nll": float((nll_NxT * w).sum() / w.sum()),
          "accuracy": float(((argmax_NxT == targets_NxT) & w).sum() / w.sum()),
          "first_token_accuracy": float((argmax_NxT[:, 0] == targets_NxT[:, 0]).mean())}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--split", default="valid")
  p.add_argument("--n", type=int, default=256)
  p.add_argument("--no-repeat-ngram-size", type=int, default=None)
  p.add_argument("--reference", action="store_true",
                 help="also the nll with XLA attention in float32")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)

  gen = CodeGenerator.from_checkpoint(args.checkpoint)
  tok, cfg = gen.tokenizer, gen.config
  source = gen.prepared.source(args.split)
  rows = [source[i] for i in range(min(args.n, len(source)))]
  descs, codes = [r["description"] for r in rows], [r["code"] for r in rows]
  width_t = max(gen.code_buckets)
  targets = np.array([postprocess.pad(tok.encode_code(c, int(cfg.data.max_code_len)), width_t)
                      for c in codes], np.int32)

  uses_retrieval = bool(gen.retrieval_k)
  width = gen.max_ctx_len if uses_retrieval else gen.max_desc_len
  nbs = gen.retrieve(descs) if uses_retrieval else [[] for _ in descs]
  ctx = {
      "as generated": [gen._input_ids(d, i, [n["tokens"] for n in nbs[i]])
                       for i, d in enumerate(descs)],
      "description alone": [gen._description_ids(d, i) for i, d in enumerate(descs)],
  }
  ctx["shuffled input"] = ctx["as generated"][1:] + ctx["as generated"][:1]
  if uses_retrieval:   # can it copy? the reference itself as first neighbour
    ctx["own code as first neighbour"] = [
        gen._input_ids(d, i, [tok.encode(c), *[n["tokens"] for n in nbs[i]][:-1]])
        for i, (d, c) in enumerate(zip(descs, codes))]
  ctx = {k: np.array([postprocess.pad(x, width) for x in v], np.int32) for k, v in ctx.items()}

  out = {"checkpoint": args.checkpoint, "step": gen.step, "split": args.split,
         "examples": len(rows), "device": jax.devices()[0].device_kind, "rows": {}}
  for name, c in ctx.items():
    nll, arg = teacher_forced(gen.model, gen.variables, c, targets)
    out["rows"][name] = token_stats(nll, arg, targets)

  ngram = (int(cfg.sample.get("no_repeat_ngram_size", 0)) if args.no_repeat_ngram_size is None
           else args.no_repeat_ngram_size)
  greedy = []
  for s in range(0, len(rows), 64):
    c = ctx["as generated"][s:s + 64]
    t, _ = model_decoding.generate(gen.model, gen.variables, jnp.asarray(c), strategy="greedy",
                                   max_new_tokens=width_t, no_repeat_ngram_size=ngram)
    greedy.append(np.asarray(jax.device_get(t))[:, 0])
  greedy = np.concatenate(greedy)
  outputs = [tok.decode(g.tolist()) for g in greedy]
  out["no_repeat_ngram_size"] = ngram
  if not ngram:   # the decoder's own argmax over greedy's tokens: equal to them
    nll, arg = teacher_forced(gen.model, gen.variables, ctx["as generated"], greedy)
    w = greedy != PAD_ID
    out["self_consistency_mismatch"] = float(((arg != greedy) & w).sum() / w.sum())
  if args.reference:
    ref_cfg = cfg.copy_and_resolve_references()
    ref_cfg.model.attention_impl, ref_cfg.model.dtype = "xla", "float32"
    ref = CodeGenerator(ref_cfg, gen.variables, tok)
    nll_r, arg_r = teacher_forced(ref.model, ref.variables, ctx["as generated"], targets)
    out["rows"]["as generated, XLA float32"] = token_stats(nll_r, arg_r, targets)

  bleu = metrics.bleu_details(outputs, codes)
  lengths = (greedy != PAD_ID).sum(1)
  ref_lengths = (targets != PAD_ID).sum(1)
  out["greedy"] = {
      **bleu,
      "mean_tokens": float(lengths.mean()), "mean_reference_tokens": float(ref_lengths.mean()),
      "ends_in_eos": float((greedy == EOS_ID).any(1).mean()),
      "first_token_matches": float((greedy[:, 0] == targets[:, 0]).mean()),
      "parses": float(np.mean([postprocess.parses(o) for o in outputs])),
  }
  out["samples"] = [{"description": d, "reference": c, "greedy": o}
                    for d, c, o in list(zip(descs, codes, outputs))[:5]]

  print(f"{out['examples']} {args.split} examples, step {gen.step}, {out['device']}")
  print("| input | nll/token | token acc | first-token acc |\n|---|---:|---:|---:|")
  for name, r in out["rows"].items():
    print(f"| {name} | {r['nll']:.3f} | {r['accuracy']:.3f} | {r['first_token_accuracy']:.3f} |")
  g = out["greedy"]
  print(f"greedy: BLEU {g['bleu']:.2f} (brevity penalty {g['bp']:.3f}, precisions "
        f"{'/'.join(f'{x:.0f}' for x in g['precisions'])}), {g['mean_tokens']:.1f} tokens vs "
        f"reference {g['mean_reference_tokens']:.1f}, EOS {g['ends_in_eos']:.0%}, first token "
        f"{g['first_token_matches']:.0%}, parses {g['parses']:.0%} (no_repeat_ngram_size "
        f"{ngram})" + (f"; self-consistency mismatch {out['self_consistency_mismatch']:.2%}"
                       if "self_consistency_mismatch" in out else ""))
  for s in out["samples"][:3]:
    print(f"# {s['description']}\n{s['greedy']}---")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
