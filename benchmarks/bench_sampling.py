"""Decoding speed at BENCH-A (shared/BENCH.md): 64 descriptions of 64 tokens, exactly N new tokens.

  python benchmarks/bench_sampling.py [--batch 64] [--new-tokens 256] [--strategies greedy,beam]

Random base-size parameters (matrices cast to bf16 as `CodeGenerator` does), EOS made impossible
through the logits bias so every row decodes all N tokens. Per-step time is
(time(N tokens) - time(1 token)) / (N - 1), so the encoder and cache set-up are not in it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flax_albert_code.model import albert as model_lib  # noqa: E402
from flax_albert_code.inference import model_decoding  # noqa: E402
from flax_albert_code.inference.generator import inference_params  # noqa: E402
from flax_albert_code import config as config_lib  # noqa: E402
from flax_albert_code.config import CLS_ID, EOS_ID, SEP_ID  # noqa: E402


def random_model(config, batch: int, desc_len: int):
  """(model, model config, [batch, desc_len] random descriptions, inference variables): random
  weights cast as CodeGenerator casts them, EOS made impossible so every row decodes in full."""
  model, cfg = model_lib.build(config)
  rng = np.random.RandomState(0)
  desc = rng.randint(SEP_ID + 1, cfg.vocab_size, (batch, desc_len)).astype(np.int32)
  desc[:, 0], desc[:, -1] = CLS_ID, SEP_ID
  desc = jnp.asarray(desc)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), desc, desc[:, :8])
  variables = inference_params(variables, cfg.compute_dtype)
  bias = variables["params"]["decoder"]["logits_bias"]
  variables["params"]["decoder"]["logits_bias"] = bias.at[EOS_ID].set(-1e4)
  return model, cfg, desc, variables


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--desc-len", type=int, default=64)
  p.add_argument("--new-tokens", type=int, default=256)
  p.add_argument("--strategies", default="greedy,beam")
  p.add_argument("--num-beams", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--attention", default="", help="override config.model.attention_impl")
  p.add_argument("--no-scan", action="store_true", help="config.model.scan_layers=False")
  p.add_argument("--scan", action="store_true", help="config.model.scan_layers=True")
  p.add_argument("--decode-xla", action="store_true",
                 help="experiment: XLA attention for one-token queries even when cuDNN is set")
  p.add_argument("--decode-attention", default="", help="config.model.decode_attention")
  p.add_argument("--decode-phase", type=int, default=None,
                 help="override config.sample.decode_phase (0: attend to the whole cache)")
  p.add_argument("--no-fused-qkv", action="store_true", help="config.model.fused_qkv=False")
  p.add_argument("--hlo", default="", help="write the compiled HLO of each strategy here")
  p.add_argument("--profile", default="", help="write a perfetto trace of one run of each here")
  args = p.parse_args()

  config = config_lib.load_config("base")
  if args.attention:
    config.model.attention_impl = args.attention
  if args.no_scan or args.scan:
    config.model.scan_layers = args.scan
  if args.decode_attention:
    config.model.decode_attention = args.decode_attention
  if args.decode_phase is not None:
    config.sample.decode_phase = args.decode_phase
  if args.no_fused_qkv:
    config.model.fused_qkv = False
  if args.decode_xla:
    from flax_albert_code.model import layers  # pylint: disable=import-outside-toplevel
    attention = layers.attention

    def one_token_xla(q, k, v, *, impl, **kw):
      return attention(q, k, v, impl="xla" if q.shape[1] == 1 else impl, **kw)
    layers.attention = one_token_xla
  model, cfg, desc, variables = random_model(config, args.batch, args.desc_len)

  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"attention {cfg.attention_impl}{' (XLA for one token)' if args.decode_xla else ''}; "
        f"scan {cfg.scan_layers}; fused qkv {cfg.fused_qkv}; "
        f"decode phase {config.sample.decode_phase}; decode attention {cfg.decode_attention}")
  rows = []
  n = args.new_tokens
  for strategy in args.strategies.split(","):
    def run(t, strategy=strategy):
      return model_decoding.generate(model, variables, desc, strategy=strategy,
                                     max_new_tokens=t, num_beams=args.num_beams, num_samples=1,
                                     top_p=1.0, decode_phase=config.sample.decode_phase)
    tokens, _ = run(n)
    if args.hlo:   # the program generate() runs, lowered with generate()'s own arguments
      os.makedirs(args.hlo, exist_ok=True)
      jitted = model_decoding._generate  # pylint: disable=protected-access
      texts = []

      def capture(*a, jitted=jitted, texts=texts, **kw):
        texts.append(jitted.lower(*a, **kw).compile().as_text())
        return jitted(*a, **kw)
      model_decoding._generate = capture  # pylint: disable=protected-access
      try:
        run(n)
      finally:
        model_decoding._generate = jitted  # pylint: disable=protected-access
      with open(os.path.join(args.hlo, f"{strategy}.hlo.txt"), "w") as f:
        f.write(texts[0])
    assert tokens.shape[-1] == n and int((np.asarray(tokens) != 0).sum(-1).min()) == n, \
        "not every row decoded all tokens"
    t_full, t_one = timed(lambda: run(n), args.repeats), timed(lambda: run(1), args.repeats)
    step_ms = 1e3 * (t_full - t_one) / (n - 1)
    rows.append((strategy, t_full * 1e3, step_ms, args.batch * n / t_full))
    if args.profile:
      import gpu_kernels   # this directory  # pylint: disable=import-outside-toplevel
      with jax.profiler.trace(os.path.join(args.profile, strategy), create_perfetto_trace=True):
        jax.block_until_ready(run(n))
      print(f"{strategy}, one call of {n} new tokens:")
      gpu_kernels.print_table(*gpu_kernels.from_trace(os.path.join(args.profile, strategy)),
                              per=n, unit="new token (encoder and set-up included)")
  print(f"{'strategy':<10}{'total ms':>10}{'ms/step':>10}{'new tok/s':>12}")
  for s, total, step, tps in rows:
    print(f"{s:<10}{total:>10.1f}{step:>10.3f}{tps:>12.0f}")


if __name__ == "__main__":
  main()
