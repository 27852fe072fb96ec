"""Tests of dualform.data.packing: query encoding, demonstration packing (PROTOCOL §4), FT sequences (§7)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dualform.data import packing, tasks
from dualform.data.packing import LabelTokenError
from dualform.data.tasks import Example

SEPARATOR = 1


class WordTokenizer:
  """A fake tokenizer: one token per `` ?word`` piece (a space attaches to the next word).

  Ids are assigned on first sight from 10 up, so ``Sentence: a b Label:`` is 4 tokens and ``" Negative"`` 1.
  """

  def __init__(self, bos_id=None, name="words"):
    self.name = name
    self.bos_id = bos_id
    self.separator_id = SEPARATOR
    self.vocab: dict[str, int] = {}
    self.vocab_size = 1000

  def encode(self, text: str) -> list[int]:
    return [self.vocab.setdefault(piece, 10 + len(self.vocab)) for piece in re.findall(r" ?\S+| +", text)]


def _pool(word_counts, labels=None):
  labels = labels or [i % 2 for i in range(len(word_counts))]
  return [Example(fields={"text": " ".join(f"w{i}x{j}" for j in range(count))}, label=label, index=i)
          for i, (count, label) in enumerate(zip(word_counts, labels))]


def _demo_length(word_count):  # "Sentence:" + words + " Label:" + label + separator
  return word_count + 4


def test_word_tokenizer_lengths_are_as_documented():
  tok = WordTokenizer()
  query = packing.encode_query(tok, "sst2", _pool([3])[0])
  assert len(query.input_ids) == 5 and query.label_ids == ((tok.encode(" Negative")[0],),
                                                          (tok.encode(" Positive")[0],))
  assert isinstance(tok, packing.Tokenizer)


def test_demonstration_order_is_the_numpy_permutation():
  np.testing.assert_array_equal(packing.demonstration_order(10, 3), np.random.default_rng(3).permutation(10))
  with pytest.raises(ValueError, match="pool_size"):
    packing.demonstration_order(0, 3)
  with pytest.raises(ValueError, match="seed"):
    packing.demonstration_order(5, -1)


@pytest.mark.parametrize("bos_id", [None, 0])
def test_pack_context_by_hand(bos_id):
  tok = WordTokenizer(bos_id=bos_id)
  start = 0 if bos_id is None else 1
  pool = _pool([2, 1, 3, 1, 1])  # demo lengths 6, 5, 7, 5, 5
  order = [1, 0, 2, 3, 4]
  # M = 4, max_len = start + 16: demos 1 (5) and 0 (6) fit, start + 11 + 4 < start + 16; demo 2 (7)
  # would need start + 18 + 4 < start + 16, which fails, and packing stops although demos 3 and 4 are shorter.
  context = packing.pack_context(tok, "sst2", pool, order, max_query_len=4, max_len=16 + start, k=5)
  assert context.k_eff == 2
  assert context.demo_pool_indices == (1, 0) == context.drawn_pool_indices
  assert context.bos == (bos_id is not None) and context.token_ids[:start] == [0] * start
  assert context.demo_spans == ((start, start + 4), (start + 5, start + 10))
  assert context.separator_positions == (start + 4, start + 10)
  assert context.label_positions == (start + 3, start + 9)
  assert context.context_length == start + 11
  assert [context.token_ids[p] for p in context.separator_positions] == [SEPARATOR, SEPARATOR]
  for (begin, end), ids in zip(context.demo_spans, context.demo_token_ids):
    assert tuple(context.token_ids[begin:end]) == ids
  assert context.token_ids[context.label_positions[0]] == tok.encode(" Positive")[0]  # pool[1] has label 1
  assert context.demo_token_positions.tolist() == [*range(start, start + 4), *range(start + 5, start + 10)]
  assert context.demo_labels == (1, 0)
  assert context.text == "Sentence: w1x0 Label: Positive\nSentence: w0x0 w0x1 Label: Negative\n"
  # The inequality is strict: at max_len = start + 15 the second demo (start + 11 + 4 = max_len) no longer fits.
  tighter = packing.pack_context(tok, "sst2", pool, order, max_query_len=4, max_len=15 + start, k=5)
  assert tighter.k_eff == 1
  # k caps the count.
  assert packing.pack_context(tok, "sst2", pool, order, max_query_len=4, max_len=500, k=3).k_eff == 3


def test_pack_context_default_order_uses_seed():
  tok = WordTokenizer()
  pool = _pool([1] * 8)
  context = packing.pack_context(tok, "sst2", pool, max_query_len=3, max_len=1000, k=4, seed=7)
  assert list(context.demo_pool_indices) == np.random.default_rng(7).permutation(8)[:4].tolist()


def test_perm_id_permutes_the_packed_set():
  tok = WordTokenizer()
  pool = _pool([1, 2, 3, 1, 2, 3, 1, 2])
  base = packing.pack_context(tok, "sst2", pool, max_query_len=3, max_len=1000, k=6, seed=5)
  permuted = packing.pack_context(tok, "sst2", pool, max_query_len=3, max_len=1000, k=6, seed=5, perm_id=2)
  expected = np.random.default_rng([5, 2]).permutation(6)
  assert permuted.permutation == tuple(expected.tolist())
  assert permuted.demo_pool_indices == tuple(base.demo_pool_indices[i] for i in expected)
  assert permuted.drawn_pool_indices == base.demo_pool_indices
  assert sorted(permuted.demo_pool_indices) == sorted(base.demo_pool_indices)
  assert len(permuted.token_ids) == len(base.token_ids) and permuted.k_eff == base.k_eff
  assert base.permutation is None
  record = permuted.to_record()
  assert record["perm_id"] == 2 and record["permutation"] == expected.tolist()


def test_pack_context_errors():
  tok = WordTokenizer()
  pool = _pool([1, 1, 1])
  with pytest.raises(ValueError, match="k=4 exceeds the pool of 3"):
    packing.pack_context(tok, "sst2", pool, [0, 1, 2], max_query_len=3, k=4)
  with pytest.raises(ValueError, match="nothing fits"):
    packing.pack_context(tok, "sst2", pool, [0, 1, 2], max_query_len=3, max_len=8, k=2)  # 0 + 5 + 3 = 8
  with pytest.raises(ValueError, match="nothing fits"):
    packing.pack_context(tok, "sst2", pool, [0, 1, 2], max_query_len=10, max_len=10, k=2)
  with pytest.raises(ValueError, match="needs seed"):
    packing.pack_context(tok, "sst2", pool, [0, 1, 2], max_query_len=3, k=2, perm_id=1)
  with pytest.raises(ValueError, match="repeats a pool index"):
    packing.pack_context(tok, "sst2", pool, [0, 0, 2], max_query_len=3, k=2)
  with pytest.raises(ValueError, match="outside 0..2"):
    packing.pack_context(tok, "sst2", pool, [0, 3], max_query_len=3, k=2)
  bad = [Example(fields={"text": "a"}, label=5, index=0)] + pool
  with pytest.raises(ValueError, match="has label 5"):
    packing.pack_context(tok, "sst2", bad, [0, 1], max_query_len=3, k=2)


@settings(max_examples=60, deadline=None)
@given(word_counts=st.lists(st.integers(1, 12), min_size=1, max_size=12), max_query_len=st.integers(1, 20),
       room=st.integers(0, 80), k=st.integers(1, 12), seed=st.integers(0, 2**16), bos=st.booleans())
def test_packing_invariants(word_counts, max_query_len, room, k, seed, bos):
  tok = WordTokenizer(bos_id=0 if bos else None)
  pool = _pool(word_counts)
  max_len = int(bos) + max_query_len + 1 + room
  k = min(k, len(pool))
  order = packing.demonstration_order(len(pool), seed)
  lengths = [_demo_length(word_counts[i]) for i in order]
  # Reference: the first j candidates fit while cumulative length stays strictly below max_len - M.
  expected = 0
  total = int(bos)
  while expected < k and total + lengths[expected] + max_query_len < max_len:
    total += lengths[expected]
    expected += 1
  if expected == 0:
    with pytest.raises(ValueError, match="nothing fits"):
      packing.pack_context(tok, "sst2", pool, order, max_query_len=max_query_len, max_len=max_len, k=k)
    return
  context = packing.pack_context(tok, "sst2", pool, order, max_query_len=max_query_len, max_len=max_len, k=k)
  assert context.k_eff == expected
  assert context.context_length == total and context.context_length + max_query_len < max_len
  assert list(context.demo_pool_indices) == order[:expected].tolist()
  ends = [int(bos)] + [position + 1 for position in context.separator_positions[:-1]]
  assert [span[0] for span in context.demo_spans] == ends  # demonstrations are contiguous
  assert sum(context.demo_lengths) + context.k_eff + int(bos) == context.context_length


@pytest.mark.parametrize("bos_id", [None, 0])
def test_finetune_sequences_match_the_packed_demonstrations(bos_id):
  tok = WordTokenizer(bos_id=bos_id)
  pool = _pool([2, 1, 3])
  context = packing.pack_context(tok, "sst2", pool, [2, 0, 1], max_query_len=3, max_len=100, k=3)
  sequences = packing.finetune_sequences(tok, "sst2", context)
  start = [] if bos_id is None else [bos_id]
  assert list(sequences) == [start + list(ids) for ids in context.demo_token_ids]
  assert len(sequences) == 3 and sequences[0] == sequences.token_ids[0]
  assert sequences.pool_indices == (2, 0, 1)
  for ids, targets, demo_mask in zip(sequences.token_ids, sequences.target_masks, sequences.demo_token_masks):
    assert targets == [False] + [True] * (len(ids) - 1)  # every token after BOS / from the second on
    assert demo_mask == [bos_id is None] + [True] * (len(ids) - 1)
  # The FT demo tokens, concatenated, are exactly the ICL context's demo tokens (Kendall alignment).
  ft_tokens = [token for ids, mask in zip(sequences.token_ids, sequences.demo_token_masks)
               for token, keep in zip(ids, mask) if keep]
  assert ft_tokens == [context.token_ids[p] for p in context.demo_token_positions]
  assert sequences.num_demo_tokens == len(context.demo_token_positions)
  # From examples, in the given order, the same sequences come out.
  from_examples = packing.finetune_sequences(tok, "sst2", [pool[2], pool[0], pool[1]])
  assert from_examples.token_ids == sequences.token_ids


def test_multitoken_labels_need_the_flag():
  tok = WordTokenizer()
  example = Example(fields={"premise": "p", "hypothesis": "h"}, label=1, index=0)
  with pytest.raises(LabelTokenError, match="allow_multitoken_labels=True"):
    packing.encode_query(tok, "cb", example, template_index=1)  # " Answer: No." is two pieces
  query = packing.encode_query(tok, "cb", example, template_index=1, allow_multitoken_labels=True)
  assert [len(ids) for ids in query.label_ids] == [2, 2, 2]
  assert query.length == len(query.input_ids) + 2
  assert not packing.labels_are_single_tokens(tok, "cb", 1) and packing.labels_are_single_tokens(tok, "cb")


def test_max_query_length_and_prompt_layout():
  tok = WordTokenizer()
  examples = _pool([1, 4, 2])
  assert packing.max_query_length(tok, "sst2", examples) == 4 + 2 + 1
  query = packing.encode_query(tok, "sst2", examples[1])
  context = [0, 5, 6, 1]
  layout = packing.prompt_layout(context, query)
  assert layout.token_ids == context + query.input_ids + [query.label_ids[0][0]]
  assert layout.context_length == 4 and layout.label_position == 4 + 6 and layout.prediction_position == 9
  assert layout.query_positions.tolist() == list(range(4, 11))
  assert packing.prompt_layout(packing.zero_shot_context(WordTokenizer(bos_id=0)), query).context_length == 1
  with pytest.raises(ValueError, match="at least one"):
    packing.max_query_length(tok, "sst2", [])


# PROTOCOL §12.5 (fairseq indices) and §13.3 (SmolLM2 ids), in class order per task.
FAIRSEQ_LABEL_IDS = {"sst2": (28150, 25968), "sst5": (6587, 1099, 7974, 205, 372), "mr": (28150, 25968),
                     "subj": (4554, 22262), "agnews": (623, 1847, 2090, 3777), "cb": (7447, 35297, 9081)}
SMOLLM2_LABEL_IDS = {"sst2": (26990, 20085), "sst5": (13321, 3309, 9174, 1123, 1109), "mr": (26990, 20085),
                     "subj": (6987, 16344), "agnews": (2260, 15278, 8460, 5804), "cb": (3635, 4178, 21691)}


def test_real_tokenizers_give_protocol_label_ids(fairseq_tokenizer, smollm2_tokenizer):
  for name in tasks.TASK_NAMES:
    assert packing.check_single_token_labels(fairseq_tokenizer, name) == FAIRSEQ_LABEL_IDS[name]
    assert packing.check_single_token_labels(smollm2_tokenizer, name) == SMOLLM2_LABEL_IDS[name]
  assert fairseq_tokenizer.separator_id == 2 and fairseq_tokenizer.bos_id == 0
  assert smollm2_tokenizer.separator_id == 198 and smollm2_tokenizer.bos_id is None


def test_cb_packs_19_demonstrations_like_the_original(fairseq_tokenizer):
  # LMOps icl_k_dict hard-codes cb: 19 for GPT 1.3B at seed 3 (PROTOCOL §4, §7); the CB pool keeps HF order.
  if not (tasks.default_data_dir() / "cb" / "train.jsonl").is_file():
    pytest.skip("shared data not found")
  evaluated = tasks.load_eval_set("cb")
  max_query_len = packing.max_query_length(fairseq_tokenizer, "cb", evaluated)
  context = packing.pack_context(fairseq_tokenizer, "cb", tasks.load_pool("cb"), max_query_len=max_query_len,
                                 seed=3)
  assert context.k_eff == 19
  assert context.token_ids[0] == 0 and context.token_ids[-1] == 2
  assert context.context_length + max_query_len < 2048


def test_encode_queries_equals_encode_query_per_example():
  """The batched form gives the per-example queries (inputs in one batch, answers encoded once)."""
  class BatchingTokenizer(WordTokenizer):
    calls = 0

    def encode_batch(self, texts):
      self.calls += 1
      return [self.encode(text) for text in texts]

  for tok in (WordTokenizer(), BatchingTokenizer()):
    examples = _pool([1, 2, 3, 4, 5, 6])
    batched = packing.encode_queries(tok, "sst2", examples)
    assert batched == [packing.encode_query(tok, "sst2", example) for example in examples]
    assert [len(query.input_ids) for query in batched] == [count + 2 for count in range(1, 7)]
    assert packing.encode_queries(tok, "sst2", []) == []
  assert tok.calls == 1 + 6  # one batch for the six inputs, then one per encode_query


def test_an_input_that_encodes_to_no_tokens_is_refused_by_name():
  class Silent(WordTokenizer):
    def encode(self, text):
      return [] if "silent" in text else super().encode(text)

  examples = [Example(fields={"text": "fine"}, label=0, index=0), Example(fields={"text": "silent"}, label=1, index=1)]
  with pytest.raises(ValueError, match="encodes the input .*silent.* to no tokens"):
    packing.encode_queries(Silent(), "sst2", examples)
