"""Tests of dualform.data.corpus: splits, the token cache, block streams and evaluation blocks."""

import json
import pathlib

import numpy as np
import pytest

from dualform.data import corpus


class CharTokenizer:
  """A stand-in tokenizer: one id per byte, offset by 1 so 0 stays the end-of-text id."""

  def __init__(self):
    self.calls = 0

  def encode(self, text):
    self.calls += 1
    return [byte + 1 for byte in text.encode()]


def _book(title: str, body: str, style: int) -> str:
  start = (f"*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***" if style == 0 else
           f"***START OF THE PROJECT GUTENBERG EBOOK {title}***")
  end = start.replace("START", "END")
  return f"Header of {title}\r\nRelease date\r\n{start}\r\n\r\n{body}\r\n{end}\r\nLicence text\r\n"


@pytest.fixture
def fake_root(tmp_path) -> pathlib.Path:
  root = tmp_path / "corpora"
  (root / "gutenberg").mkdir(parents=True)
  for book_id in range(1, 31):  # 30 books: sorted indices 0 and 15 valid, 1 and 16 test
    (root / "gutenberg" / f"{book_id * 7}.txt").write_text(_book(f"BOOK {book_id}", f"Text of book {book_id}.",
                                                                 book_id % 2))
  (root / "tinyshakespeare").mkdir()
  (root / "tinyshakespeare" / "input.txt").write_text("".join(f"line {i}\n" for i in range(100)))
  (root / "ptb").mkdir()
  (root / "ptb" / "valid.txt").write_text(" a b c \n d e \n")
  (root / "ptb" / "test.txt").write_text(" f \n")
  return root


def test_strip_gutenberg_keeps_only_the_book_text():
  text = _book("ALICE", "Alice was beginning\r\nto get very tired.", 0)
  assert corpus.strip_gutenberg(text) == "Alice was beginning\nto get very tired.\n"
  assert corpus.strip_gutenberg(_book("X", "body", 1)) == "body\n"
  with pytest.raises(ValueError, match="markers"):
    corpus.strip_gutenberg("no markers here")


def test_gutenberg_split_is_by_book_and_disjoint(fake_root):
  splits = {split: corpus.read_documents("gutenberg", split, fake_root) for split in ("train", "valid", "test")}
  assert [len(splits[s]) for s in ("train", "valid", "test")] == [26, 2, 2]
  # Sorted by numeric id (7, 14, ..., 210): index 0 -> book 1, index 15 -> book 16 are valid.
  assert splits["valid"] == ["Text of book 1.\n", "Text of book 16.\n"]
  assert splits["test"] == ["Text of book 2.\n", "Text of book 17.\n"]
  assert not set(splits["train"]) & (set(splits["valid"]) | set(splits["test"]))


def test_fraction_split_cuts_at_a_line_start(fake_root):
  train, = corpus.read_documents("tinyshakespeare", "train", fake_root)
  valid, = corpus.read_documents("tinyshakespeare", "valid", fake_root)
  full = (fake_root / "tinyshakespeare" / "input.txt").read_text()
  assert train + valid == full
  assert train.endswith("\n") and valid.startswith("line ")
  assert 0.89 < len(train) / len(full) < 0.92


def test_missing_split_and_unknown_corpus_raise(fake_root):
  with pytest.raises(ValueError, match="no 'train' split"):
    corpus.read_documents("ptb", "train", fake_root)
  with pytest.raises(ValueError, match="unknown corpus"):
    corpus.read_documents("enwik8", "train", fake_root)


def test_token_cache_builds_reuses_and_detects_changed_sources(fake_root, tmp_path):
  cache = tmp_path / "cache"
  tokenizer = CharTokenizer()
  tokens = corpus.corpus_tokens("ptb", "valid", cache_dir=cache, tokenizer=tokenizer, root=fake_root,
                                tokenizer_name="chars")
  expected = [byte + 1 for byte in b" a b c \n d e \n"] + [corpus.END_OF_TEXT_ID]
  np.testing.assert_array_equal(tokens, expected)
  assert tokens.dtype == np.uint16
  sidecar = json.loads((cache / "ptb.valid.chars.json").read_text())
  assert sidecar["num_tokens"] == len(expected) and "valid.txt" in sidecar["sources"]

  calls = tokenizer.calls
  again = corpus.corpus_tokens("ptb", "valid", cache_dir=cache, tokenizer=tokenizer, root=fake_root,
                               tokenizer_name="chars")
  np.testing.assert_array_equal(again, expected)
  assert tokenizer.calls == calls  # served from the cache

  (fake_root / "ptb" / "valid.txt").write_text(" z \n")
  changed = corpus.corpus_tokens("ptb", "valid", cache_dir=cache, tokenizer=tokenizer, root=fake_root,
                                 tokenizer_name="chars")
  np.testing.assert_array_equal(changed, [byte + 1 for byte in b" z \n"] + [0])


def test_carried_cache_needs_neither_sources_nor_tokenizer(fake_root, tmp_path):
  cache = tmp_path / "cache"
  built = np.array(corpus.corpus_tokens("ptb", "test", cache_dir=cache, tokenizer=CharTokenizer(),
                                        root=fake_root, tokenizer_name="chars"))
  elsewhere = tmp_path / "no_corpora"
  carried = corpus.corpus_tokens("ptb", "test", cache_dir=cache, root=elsewhere, tokenizer_name="chars",
                                 tokenizer_factory=lambda name: pytest.fail("tokenizer must not be loaded"))
  np.testing.assert_array_equal(carried, built)
  with pytest.raises(ValueError, match="no cached tokens"):
    corpus.corpus_tokens("ptb", "valid", cache_dir=cache, root=elsewhere, tokenizer_name="chars")


def test_large_ids_are_stored_as_int32():
  class Wide:
    def encode(self, text):
      return [70000, 5]
  tokens = corpus.tokenize_documents(Wide(), ["x", "y"])
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, [70000, 5, 0, 70000, 5, 0])


def test_block_stream_is_a_seeded_function_of_the_step():
  tokens = np.arange(1001, dtype=np.uint16)
  stream = corpus.BlockStream(tokens, block_len=10, batch_size=4, seed=3)
  assert stream.num_blocks == 100
  batch = stream.batch(7)
  assert batch.shape == (4, 11) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)  # contiguous windows
  assert np.all(batch[:, 0] % 10 == 0)
  # Same step, fresh stream: identical; other seed: different order.
  np.testing.assert_array_equal(corpus.BlockStream(tokens, block_len=10, batch_size=4, seed=3).batch(7), batch)
  assert not np.array_equal(corpus.BlockStream(tokens, block_len=10, batch_size=4, seed=4).batch(7), batch)
  # Every window exactly once per epoch (25 steps of 4), and epochs are reshuffled.
  epoch0 = np.concatenate([stream.block_indices(step) for step in range(25)])
  epoch1 = np.concatenate([stream.block_indices(step) for step in range(25, 50)])
  assert sorted(epoch0) == list(range(100)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)


def test_block_stream_state_round_trip_and_mismatch():
  stream = corpus.BlockStream(np.arange(500), block_len=8, batch_size=2, seed=0)
  state = json.loads(json.dumps(stream.state(12)))
  assert stream.check_state(state) == 12
  other = corpus.BlockStream(np.arange(500), block_len=16, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="block_len"):
    other.check_state(state)
  with pytest.raises(ValueError, match="too few"):
    corpus.BlockStream(np.arange(5), block_len=8, batch_size=2, seed=0)


def test_evaluation_blocks_cover_the_same_targets_at_every_length():
  tokens = np.arange(1000)
  for length in (16, 32, 64):
    blocks = corpus.evaluation_blocks(tokens, length, max_tokens=256)
    assert blocks.shape == (256 // length, length + 1)
    np.testing.assert_array_equal(blocks[:, 1:].reshape(-1), np.arange(1, 257))
  with pytest.raises(ValueError, match="at least"):
    corpus.evaluation_blocks(np.arange(10), 16)
