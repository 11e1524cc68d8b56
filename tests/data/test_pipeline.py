"""The grain pipeline: framing, bucketing, determinism, exact resume, per-host slices, sharding;
unlabelled code mixed in by a schedule."""
import dataclasses
import fractions
import os
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_albert_code import config as config_lib
from flax_albert_code.config import UNK_ID
from flax_albert_code.data import pipeline, prepared as prepared_lib, token_store
from flax_albert_code.data.sources import DataError

CLS, SEP, EOS, BOS = (config_lib.CLS_ID, config_lib.SEP_ID, config_lib.EOS_ID,
                      config_lib.BOS_ID)
BUCKETS = (32, 64, 128)  # code is ~20..170 tokens: every bucket used, some code cut


def write_tree(root, n_files=40, per_file=6):
  """Documented functions whose bodies grow from 0 to 15 lines: code lengths span the buckets."""
  for f in range(n_files):
    funcs = []
    for g in range(per_file):
      k = f * per_file + g
      body = "    x = x * 2\n" * (k % 16)
      words = " and then more" * (k % 5)
      funcs.append(f'def fn_{k}(x):\n    """Double x a few times{words}."""\n{body}    return x\n')
    (root / f"mod_{f}.py").write_text("\n\n".join(funcs))


def make_config(tree, **data):
  c = config_lib.get_config("tiny")
  c.data.update(sources=f"dir:{tree}", tokenizer_vocab_size=400, max_desc_len=24,
                max_code_len=128, code_buckets=BUCKETS, valid_fraction=0.1, test_fraction=0.1,
                **data)
  return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tree = tmp_path_factory.mktemp("tree")
  write_tree(tree)
  config = make_config(tree)
  return config, prepared_lib.prepare(config, str(tmp_path_factory.mktemp("work")))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_are_framed_and_bucketed(setup):
  config, prep = setup
  store, src, tok = prep.tokens("train"), prep.source("train"), prep.tokenizer
  batches = list(pipeline.make_iterator(config, prep, "train", 8, shuffle=True, num_epochs=1))
  seen = np.concatenate([b["index"] for b in batches])
  assert len(set(seen.tolist())) == len(seen)  # an epoch shows each example at most once
  assert len(store) - len(seen) < len(BUCKETS) * 8  # only partial batches are dropped
  assert {b["code_ids"].shape[1] for b in batches} == set(BUCKETS)
  cut = {"code": 0, "desc": 0}
  for b in batches:
    assert b["desc_ids"].shape == (8, 24) and b["desc_ids"].dtype == np.int32
    assert b["code_ids"].dtype == np.int32 and b["index"].dtype == np.int32
    width = b["code_ids"].shape[1]
    for row, i in enumerate(b["index"]):
      n_desc, n_code = store.lengths["desc"][i], store.lengths["code"][i]
      assert BUCKETS[int(np.searchsorted(BUCKETS, min(n_code + 1, 128)))] == width
      desc = b["desc_ids"][row]
      assert desc[0] == CLS and list(desc).count(SEP) == 1
      assert desc[min(n_desc, 22) + 1] == SEP and not desc[min(n_desc, 22) + 2:].any()
      code = b["code_ids"][row]
      assert BOS not in code
      if n_code < width:
        assert code[n_code] == EOS and not code[n_code + 1:].any()
        assert tok.decode(code) == src[int(i)]["code"]
      else:
        assert EOS not in code and code.all()  # cut: no EOS
        cut["code"] += 1
      assert src[int(i)]["description"].startswith(tok.decode(desc))
      cut["desc"] += src[int(i)]["description"] != tok.decode(desc)
  assert 0 < cut["code"] < len(seen) and 0 < cut["desc"] < len(seen)  # both cases were checked


def test_eval_iterator_covers_every_example_once(setup):
  config, prep = setup
  batches = list(pipeline.make_iterator(config, prep, "valid", 8, shuffle=False, num_epochs=1))
  index = np.concatenate([b["index"] for b in batches])
  real = index[index >= 0]
  assert sorted(real.tolist()) == list(range(prep.split_sizes["valid"]))
  for b in batches:
    filler = b["index"] < 0
    assert not b["code_ids"][filler].any()
    assert (b["desc_ids"][filler][:, :2] == [CLS, SEP]).all()


def test_same_seed_same_batches_other_seed_other_order(setup, monkeypatch):
  config, prep = setup
  def run(c):
    return take(pipeline.make_iterator(c, prep, "train", 8, shuffle=True, num_epochs=None), 30)
  a, b = run(config), run(config)
  assert_same(a, b)
  monkeypatch.setattr(pipeline, "SHUFFLE_SEED", 1)
  c = run(config)
  assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]


def test_resume_equals_uninterrupted(setup):
  config, prep = setup
  def make():
    return pipeline.make_iterator(config, prep, "train", 8, shuffle=True, num_epochs=None)
  per_epoch = len(pipeline.make_dataset(config, prep, "train", 8, shuffle=True, num_epochs=1))
  for k in (3, per_epoch - 2):  # mid-epoch, and a restart that crosses into the next epoch
    full = make()
    head = take(full, k)
    state = full.get_state()
    tail = take(full, 6)
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 6), tail)
    assert len(head) == k


def test_epochs_are_reshuffled(setup):
  config, prep = setup
  n = len(pipeline.make_dataset(config, prep, "train", 8, shuffle=True, num_epochs=1))
  two = take(pipeline.make_iterator(config, prep, "train", 8, shuffle=True, num_epochs=2), 2 * n)
  first, second = two[:n], two[n:]
  assert [b["index"].tolist() for b in first] != [b["index"].tolist() for b in second]


def test_hosts_split_each_global_batch(setup):
  config, prep = setup
  kw = dict(shuffle=True, num_epochs=None)
  whole = take(pipeline.make_iterator(config, prep, "train", 8, **kw), 10)
  hosts = [take(pipeline.make_iterator(config, prep, "train", 8, process_index=p,
                                       process_count=2, **kw), 10) for p in range(2)]
  for step, b in enumerate(whole):
    h0, h1 = hosts[0][step], hosts[1][step]
    assert h0["code_ids"].shape == h1["code_ids"].shape == (4, b["code_ids"].shape[1])
    for k in b:
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), b[k])
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_iterator(config, prep, "train", 9, shuffle=True, num_epochs=1,
                           process_index=0, process_count=2)


def test_too_few_examples_for_a_batch_is_a_clear_error(setup):
  config, prep = setup
  with pytest.raises(DataError, match="not one full batch of 4096"):
    pipeline.make_iterator(config, prep, "valid", 4096, shuffle=True, num_epochs=1)


def test_to_global_shards_over_8_devices(setup):
  config, prep = setup
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  batch = next(pipeline.make_iterator(config, prep, "train", 16, shuffle=True, num_epochs=None))
  out = pipeline.to_global(batch, sharding)
  assert out.keys() == batch.keys()
  for k, v in out.items():
    assert v.shape == batch[k].shape and v.sharding == sharding
    np.testing.assert_array_equal(np.asarray(v), batch[k])
    shards = sorted(v.addressable_shards, key=lambda s: s.index[0].start)
    assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
    np.testing.assert_array_equal(np.asarray(shards[3].data), batch[k][6:8])


# Denoising unlabelled code: the schedule, the batches' kinds, the corruption, resume.

def with_unlabelled(prep, n=120):
  """`prep` with an unlabelled split written as prepare writes it (empty descriptions): the
  train split's code, reversed, then again, so it has its own order and size."""
  store = prep.tokens("train")
  code = [store.tokens("code", i).tolist() for i in range(len(store))][::-1]
  code = (code * (n // len(code) + 1))[:n]
  token_store.write(os.path.join(prep.data_dir, "tokens"), "unlabelled",
                    {"desc": [[] for _ in code], "code": code}, prep.tokenizer.vocab_size)
  return dataclasses.replace(prep, split_sizes={**prep.split_sizes, "unlabelled": n},
                             _cache={})


def test_schedule_is_parsed_and_bad_ones_say_what_to_write():
  F = fractions.Fraction
  assert pipeline.parse_schedule("") == ()
  assert pipeline.parse_schedule("1.0:600,0.25") == ((F(1), 600), (F(1, 4), None))
  assert pipeline.parse_schedule(" 0.5 : 10 , 1:20 ") == ((F(1, 2), 10), (F(1), 20))
  for bad, problem in (("2", "fraction 2 is not between 0 and 1"),
                       ("0.5,0.25", "'0.5' has no ':step' but is not the last item"),
                       ("1:600,0.5:300", "step 300 does not come after 600"),
                       ("half:10", "'half' is not a fraction"),
                       ("0.5:ten", "'ten' is not a step number")):
    with pytest.raises(ValueError) as err:
      pipeline.parse_schedule(bad)
    assert str(err.value) == (
        f"config.train.unlabelled_schedule={bad!r}: {problem}; write the fraction of unlabelled "
        "batches and the step it lasts until, e.g. '1.0:600,0.25' (all unlabelled for 600 "
        "steps, then a quarter), or '' for none.")


def test_which_batches_are_unlabelled_is_a_function_of_the_index():
  def kinds(text, n):
    before = [pipeline.unlabelled_before(pipeline.parse_schedule(text), i) for i in range(n + 1)]
    return [b > a for a, b in zip(before, before[1:])]
  assert kinds("1.0:4,0.25", 12) == [True] * 4 + [False, False, False, True] * 2
  assert kinds("0.5:4", 8) == [False, True] * 2 + [False] * 4
  assert kinds("1/3", 6) == [False, False, True] * 2
  assert not any(kinds("0", 5)) and all(kinds("1", 5))
  s = pipeline.parse_schedule("1.0:600,0.25")
  assert pipeline.unlabelled_before(s, 600) == 600
  assert pipeline.unlabelled_before(s, 10**9) == 600 + (10**9 - 600) // 4


def test_unlabelled_rows_are_framed_and_bucketed_and_resume_exactly(setup):
  config, prep = setup
  prep = with_unlabelled(prep)
  unl = pipeline.unlabelled_store(prep)
  # One context row per description: neighbours of the pairs exist, unlabelled code has none.
  nb = types.SimpleNamespace(ids={"train": np.zeros((prep.split_sizes["train"], 1), np.int64)})
  config = config.copy_and_resolve_references()
  config.retrieval.k = 1
  kw = dict(shuffle=True, num_epochs=None, neighbours=nb, unlabelled_schedule="1.0:3,0.5")
  make = lambda: pipeline.make_iterator(config, prep, "train", 8, **kw)  # noqa: E731
  batches = take(make(), 40)
  kinds = [bool(b["labelled"].all()) for b in batches]
  assert all(b["labelled"].all() or not b["labelled"].any() for b in batches)
  assert kinds == [False] * 3 + [True, False] * 18 + [True]
  widths, unks = set(), 0
  for b in batches:
    assert set(b) == {"desc_ids", "code_ids", "index", "ctx_ids", "labelled"}
    if b["labelled"][0]:
      assert (b["ctx_ids"][:, 0] == CLS).all() and (b["ctx_ids"] != 0).sum(1).min() > 3
      continue
    width = b["code_ids"].shape[1]
    widths.add(width)
    assert (b["desc_ids"][:, :2] == [CLS, SEP]).all() and not b["desc_ids"][:, 2:].any()
    assert (b["ctx_ids"][:, :2] == [CLS, SEP]).all()
    for row, i in enumerate(b["index"]):
      n = unl.lengths["code"][i]
      assert BUCKETS[int(np.searchsorted(BUCKETS, min(n + 1, 128)))] == width
      code = unl.tokens("code", i)
      np.testing.assert_array_equal(b["code_ids"][row, :min(n, width)], code[:width])
      # The context is the code with spans cut to one UNK each: what is kept is the code's
      # tokens in order, and every UNK stands for at least one.
      ctx = b["ctx_ids"][row]
      seen = ctx[2:list(ctx).index(SEP, 2)].tolist()
      assert len(seen) <= len(code)
      unks += UNK_ID in seen
      rest = iter(code.tolist())
      assert all(t == UNK_ID or t in rest for t in seen)
  assert len(widths) > 1 and unks > 20
  for k in (2, 7):   # inside the all-unlabelled start, and in the alternation
    full = make()
    take(full, k)
    state = full.get_state()
    resumed = make()
    resumed.set_state(state)
    assert_same(take(resumed, 5), batches[k:k + 5])
  assert_same(take(make(), 40), batches)


def test_corrupt_spans_cuts_about_the_rate_in_spans():
  rng = np.random.default_rng(0)
  code = np.arange(10, 410)
  out = pipeline.corrupt_spans(code, rng)
  kept = out[out != UNK_ID]
  cut = len(code) - len(kept)
  spans = int((out == UNK_ID).sum())
  assert 0.08 * len(code) < cut < 0.25 * len(code) and 10 < spans < 40
  assert (np.diff(kept) > 0).all() and set(kept) <= set(code)   # order kept, nothing new
  assert np.array_equal(pipeline.corrupt_spans(np.array([7]), rng), [7])


def test_a_schedule_without_unlabelled_data_says_how_to_get_it(setup):
  config, prep = setup
  prep = dataclasses.replace(prep, split_sizes={k: v for k, v in prep.split_sizes.items()
                                                if k != "unlabelled"}, _cache={})
  nb = types.SimpleNamespace(ids={"train": np.zeros((prep.split_sizes["train"], 1), np.int64)})
  with_retrieval = config.copy_and_resolve_references()
  with_retrieval.retrieval.k = 1
  with pytest.raises(DataError, match=r"config.train.unlabelled_schedule is set but .* has no "
                                      r"unlabelled code; prepare with config.data.unlabelled="
                                      r"True, or set the schedule to ''\."):
    pipeline.make_iterator(with_retrieval, prep, "train", 8, shuffle=True, num_epochs=None,
                           unlabelled_schedule="0.5", neighbours=nb)
  # Denoised code is the decoder's context: no retrieval, no context to put it in.
  with pytest.raises(ValueError, match=r"retrieval is off \(config.retrieval.k=0\)"):
    pipeline.make_iterator(config, prep, "train", 8, shuffle=True, num_epochs=None,
                           unlabelled_schedule="0.5")


def _first_neighbour(ctx_row) -> list[int]:
  """The tokens between a context row's first and second SEP."""
  ctx = ctx_row.tolist()
  first = ctx[ctx.index(SEP) + 1:]
  return first[:first.index(SEP)]


def test_self_neighbours_put_a_training_rows_own_code_first_repeatably(setup):
  """retrieval.self_neighbour_rate: that share of training rows reads its own code, spans of
  it cut out, as first neighbour, the same rows whenever the same batch comes again;
  evaluation never."""
  config, prep = setup
  tok = prep.tokens("train")
  n = prep.split_sizes["train"]
  nb = types.SimpleNamespace(ids={s: (np.arange(prep.split_sizes[s])[:, None] + 1) % n
                                  for s in ("train", "valid")})   # the next example's code
  config = config.copy_and_resolve_references()
  config.retrieval.update(max_ctx_len=160, self_neighbour_rate=0.5)
  make = lambda split, shuffle: pipeline.make_iterator(  # noqa: E731
      config, prep, split, 8, shuffle=shuffle, num_epochs=1, neighbours=nb)
  batches = take(make("train", True), 4)
  own = 0
  for b in batches:
    for row, i in enumerate(b["index"]):
      first = _first_neighbour(b["ctx_ids"][row])
      other = tok.tokens("code", (i + 1) % n)[:len(first)].tolist()
      if first == other:
        continue
      own += 1
      # The row's own code with spans cut out: its tokens, in order, about 15% fewer.
      whole = tok.tokens("code", i).tolist()
      rest = iter(whole)
      assert all(t in rest for t in first), "not a subsequence of its own code"
      assert config_lib.UNK_ID not in first
      assert len(first) < min(len(whole), 160) or len(whole) > 160
  assert 0.3 < own / (8 * len(batches)) < 0.7
  assert_same(take(make("train", True), 4), batches)
  config.retrieval.self_neighbour_rate = 0.0
  for b in take(make("train", True), 2) + take(make("valid", False), 1):
    for row, i in enumerate(b["index"]):
      first = _first_neighbour(b["ctx_ids"][row])
      assert first == tok.tokens("code", (i + 1) % n)[:len(first)].tolist() or not first
