"""Writes the BENCH-A section of benchmarks/RESULTS.md from one run of the peer and ours
(run_gpu.sh calls it)."""
from __future__ import annotations

import argparse
import json

from bench_serving import replace_section   # this directory

HEADING = "## BENCH-A against the peer (issue 21, one H200)"


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--peer", required=True)
  ap.add_argument("--ours", required=True)
  ap.add_argument("--gpu", default="")
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  peer, ours = json.load(open(a.peer)), json.load(open(a.ours))
  v = ours["versions"]
  p_comp = peer.get("train_compiled")
  p_comp = p_comp if isinstance(p_comp, dict) else None
  rows = []

  def row(name, our, ref, unit, note=""):
    ratio = f"{our / ref:.2f}x" if ref else "n/a"
    rows.append(f"| {name} | {our:,.0f} {unit} | {ref:,.0f} {unit} | {ratio} | {note} |"
                if ref else f"| {name} | {our:,.0f} {unit} | n/a | n/a | {note} |")

  tg, tf = ours["train_generation_step"], ours["train_full_step"]
  ref = p_comp["tokens_per_s"] if p_comp else peer["train_eager"]["tokens_per_s"]
  row("train, generation step (vs peer torch.compile)", tg["tokens_per_s"], ref, "tok/s",
      f"{tg['step_ms']:.1f} ms, {tg['model_tflops']:.0f} TFLOP/s, MFU {tg['mfu'] or 0:.1%}")
  row("train, generation step (vs peer eager)", tg["tokens_per_s"],
      peer["train_eager"]["tokens_per_s"], "tok/s")
  row("train, full step with alignment (vs peer torch.compile)", tf["tokens_per_s"], ref, "tok/s",
      f"{tf['step_ms']:.1f} ms, {tf['model_tflops']:.0f} TFLOP/s, MFU {tf['mfu'] or 0:.1%}")
  gg, gb = ours["generate_greedy"], ours["generate_beam4"]
  row("generate greedy, 64 x 256 new tokens", gg["tokens_per_s"],
      peer["generate_greedy"]["tokens_per_s"], "new tok/s", f"{gg['ms_per_step']:.3f} ms/step")
  row("generate beam 4", gb["tokens_per_s"], peer["generate_beam4"]["tokens_per_s"], "new tok/s",
      f"{gb['ms_per_step']:.3f} ms/step")
  mb = ours.get("max_batch", {})
  fits = [int(b) for b, r in mb.items() if r.get("ok")]
  lines = [
      HEADING,
      "",
      f"BENCH-A (../shared/BENCH.md), one run of `bash benchmarks/run_gpu.sh` on "
      f"{a.gpu or v['device']}, "
      f"{v['date']}. Ours: jax {v['jax']}, flax {v['flax']}, optax {v['optax']}. "
      f"Peer: torch {peer.get('torch')}, transformers {peer.get('transformers')}.",
      "",
      "| figure | ours | peer | ours/peer | notes |",
      "| --- | --- | --- | --- | --- |",
      *rows,
      "",
      f"Ceilings measured in the same run (peer script): bf16 matmul "
      f"{peer.get('matmul_bf16_tflops', 0):.0f} TFLOP/s, device copy "
      f"{peer.get('copy_TBps', 0):.2f} TB/s.",
      f"Compile time of the base train step: {tg['compile_s']:.1f} s (generation step), "
      f"{tf['compile_s']:.1f} s (full step). Peak device memory at batch 64: "
      f"{(tf['peak_bytes'] or 0) / 2**30:.1f} GiB.",
      f"Largest batch tried that fits (full step, bf16, no remat): {max(fits) if fits else 'n/a'} "
      f"({', '.join(f'{b}: ' + ('ok' if r.get('ok') else 'OOM') for b, r in mb.items())}).",
      f"Model FLOPs are counted by formula (flax_albert_code/metrics.py): "
      f"{tg['flops_per_step'] / 1e12:.2f} TFLOP per generation step; the peer counts its own with "
      "torch's FlopCounterMode ("
      f"{(p_comp or peer['train_eager'])['flops_per_step'] / 1e12:.2f} TFLOP "
      "per step, a BERT decoder of 6 unshared layers).",
  ]
  text = "\n".join(lines) + "\n"
  replace_section(a.out, HEADING, text)
  print(text)


if __name__ == "__main__":
  main()
