"""Plain-text pretraining corpora: deterministic splits, cached SmolLM2 token arrays, seeded block streams.

The corpora are the read-only files in ``<shared>/corpora`` (see its README): WikiText-2 / WikiText-103 /
WikiText-2 raw and PTB (valid and test only, no train split), tiny-shakespeare (one file) and 45 Project
Gutenberg books. Where the source has no split this module makes a deterministic one:

* ``gutenberg``: by book. Books sorted by Project Gutenberg id; sorted index ``i % 15 == 0`` is
  ``valid``, ``i % 15 == 1`` is ``test``, the rest ``train`` (39 / 3 / 3 books). The PG header before the
  ``*** START OF ...`` marker and the licence after ``*** END OF ...`` are stripped, ``\\r\\n`` -> ``\\n``.
* ``tinyshakespeare``: first 90% of the characters ``train`` (cut at the next line start), last 10%
  ``valid`` (the char-rnn / nanoGPT convention); no ``test``.

Every document is tokenized whole (no BOS) and followed by ``<|endoftext|>`` (id 0 in SmolLM2); documents are
concatenated in file order into one int array per (corpus, split). Arrays are cached as ``.npy``
(``uint16`` when every id fits, else ``int32``) with a JSON sidecar recording the source files' sha256 and a
tokenizer fingerprint, so a cache built here can be carried to a machine without the corpora or the
tokenizer (:func:`corpus_tokens` then trusts the sidecar).

Public names:
  CORPORA, CorpusSpec, shared_dir, corpora_dir, default_cache_dir, read_documents, tokenize_documents,
  corpus_tokens, build_cache, BlockStream, evaluation_blocks, main (``python -m dualform.data.corpus``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Callable, Iterable, Sequence

import numpy as np

_FORMAT_VERSION = 1
END_OF_TEXT_ID = 0  # SmolLM2 ``<|endoftext|>`` (PROTOCOL.md §13.1)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """One corpus folder and how its splits are formed.

  Attributes:
    name: key in :data:`CORPORA`.
    folder: sub-folder of ``<shared>/corpora``.
    split_files: for corpora shipped with splits, split name -> file name.
    split_rule: ``"files"`` (splits are files), ``"by_book"`` (gutenberg) or ``"by_fraction"`` (one file).
  """

  name: str
  folder: str
  split_files: tuple[tuple[str, str], ...] = ()
  split_rule: str = "files"

  @property
  def splits(self) -> tuple[str, ...]:
    if self.split_rule == "files":
      return tuple(split for split, _ in self.split_files)
    if self.split_rule == "by_book":
      return ("train", "valid", "test")
    return ("train", "valid")


_VALID_TEST = (("valid", "valid.txt"), ("test", "test.txt"))
CORPORA: dict[str, CorpusSpec] = {
    "wikitext-2": CorpusSpec("wikitext-2", "wikitext-2", _VALID_TEST),
    "wikitext-103": CorpusSpec("wikitext-103", "wikitext-103", _VALID_TEST),
    "wikitext-2-raw": CorpusSpec("wikitext-2-raw", "wikitext-2-raw", _VALID_TEST),
    "ptb": CorpusSpec("ptb", "ptb", _VALID_TEST),
    "tinyshakespeare": CorpusSpec("tinyshakespeare", "tinyshakespeare", split_rule="by_fraction"),
    "gutenberg": CorpusSpec("gutenberg", "gutenberg", split_rule="by_book"),
}

_TRAIN_FRACTION = 0.9
_BOOK_FOLD = 15
_START_MARKER = re.compile(r"^\*\*\* ?START OF (?:THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE)
_END_MARKER = re.compile(r"^\*\*\* ?END OF (?:THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE)


def shared_dir() -> pathlib.Path:
  """``$DUALFORM_SHARED_DIR``, else ``<project root>/../shared``."""
  env = os.environ.get("DUALFORM_SHARED_DIR")
  if env:
    return pathlib.Path(env)
  return pathlib.Path(__file__).resolve().parents[2].parent / "shared"


def corpora_dir() -> pathlib.Path:
  """``<shared>/corpora``."""
  return shared_dir() / "corpora"


def default_cache_dir(workdir: str | os.PathLike | None = None) -> pathlib.Path:
  """``$DUALFORM_CACHE/corpus`` when set, else ``<workdir>/token_cache``, else ``~/.cache/dualform/corpus``."""
  env = os.environ.get("DUALFORM_CACHE")
  if env:
    return pathlib.Path(env) / "corpus"
  if workdir is not None:
    return pathlib.Path(workdir) / "token_cache"
  return pathlib.Path.home() / ".cache" / "dualform" / "corpus"


def _get_spec(corpus: str, split: str) -> CorpusSpec:
  if corpus not in CORPORA:
    raise ValueError(f"unknown corpus {corpus!r}; choose one of {sorted(CORPORA)}")
  spec = CORPORA[corpus]
  if split not in spec.splits:
    raise ValueError(f"corpus {corpus!r} has no {split!r} split (available: {spec.splits}); the README says "
                     "WikiText/PTB train splits are not shipped: train on gutenberg or tinyshakespeare")
  return spec


def strip_gutenberg(text: str) -> str:
  """Book text between the PG start and end markers, with ``\\n`` line ends."""
  text = text.replace("\r\n", "\n")
  start, end = _START_MARKER.search(text), _END_MARKER.search(text)
  if start is None or end is None or end.start() < start.end():
    raise ValueError("Project Gutenberg start/end markers not found; is this a PG plain-text book?")
  return text[start.end():end.start()].strip("\n") + "\n"


def _source_files(spec: CorpusSpec, split: str, root: pathlib.Path) -> list[pathlib.Path]:
  folder = root / spec.folder
  if spec.split_rule == "files":
    return [folder / dict(spec.split_files)[split]]
  if spec.split_rule == "by_fraction":
    return [folder / "input.txt"]
  books = sorted(folder.glob("*.txt"), key=lambda path: int(path.stem))
  folds = {"valid": (0,), "test": (1,), "train": tuple(range(2, _BOOK_FOLD))}[split]
  return [book for index, book in enumerate(books) if index % _BOOK_FOLD in folds]


def read_documents(corpus: str, split: str, root: str | os.PathLike | None = None) -> list[str]:
  """The split's documents as text (one per book / file, or the split part of a single file)."""
  spec = _get_spec(corpus, split)
  root = pathlib.Path(root) if root is not None else corpora_dir()
  files = _source_files(spec, split, root)
  missing = [str(path) for path in files if not path.exists()]
  if missing or not files:
    raise ValueError(f"corpus files not found: {missing or spec.folder}; set DUALFORM_SHARED_DIR to the shared folder")
  if spec.split_rule == "by_book":
    return [strip_gutenberg(path.read_text(encoding="utf-8")) for path in files]
  text = files[0].read_text(encoding="utf-8")
  if spec.split_rule == "by_fraction":
    cut = text.find("\n", int(len(text) * _TRAIN_FRACTION)) + 1
    text = text[:cut] if split == "train" else text[cut:]
  return [text]


def _sha256_files(paths: Iterable[pathlib.Path]) -> dict[str, str]:
  return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """Encodes texts with a HF ``tokenizers.Tokenizer``-like object (``encode_batch``) or any ``encode``."""
  backend = getattr(tokenizer, "backend", None)  # dualform.tokenizer.ByteLevelBPETokenizer: batch in Rust
  if backend is not None and hasattr(backend, "encode_batch"):
    encodings = backend.encode_batch(list(texts), add_special_tokens=False)
  elif hasattr(tokenizer, "encode_batch"):
    encodings = tokenizer.encode_batch(list(texts))
  else:
    encodings = [tokenizer.encode(text) for text in texts]
  return [list(getattr(encoding, "ids", encoding)) for encoding in encodings]


def tokenizer_fingerprint(tokenizer) -> str:
  """A short hash of how the tokenizer encodes a fixed probe text (identifies it in cache sidecars)."""
  probe = "The quick brown fox, 1234 times!\n\nDemain?  Zo\u00eb said: \"ok\"\n"
  return hashlib.sha256(json.dumps(_encode_many(tokenizer, [probe])).encode()).hexdigest()[:16]


def tokenize_documents(tokenizer, documents: Sequence[str], end_of_text_id: int = END_OF_TEXT_ID) -> np.ndarray:
  """``concat_d (encode(d) + [end_of_text_id])`` as one 1-D int array (uint16 if every id fits)."""
  pieces = [np.asarray(ids + [end_of_text_id], np.int64) for ids in _encode_many(tokenizer, documents)]
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int64)
  dtype = np.uint16 if tokens.size == 0 or tokens.max() < 2**16 else np.int32
  return tokens.astype(dtype)


def _cache_paths(cache_dir: pathlib.Path, corpus: str, split: str, tokenizer_name: str):
  stem = f"{corpus}.{split}.{tokenizer_name}"
  return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _load_default_tokenizer(tokenizer_name: str):
  from dualform import tokenizer as tokenizer_module  # owned by the loading helper; imported lazily
  return tokenizer_module.load_tokenizer(tokenizer_name)


def corpus_tokens(corpus: str, split: str, *, cache_dir: str | os.PathLike | None = None,
                  tokenizer=None, tokenizer_name: str = "smollm2-135m",
                  root: str | os.PathLike | None = None, rebuild: bool = False,
                  tokenizer_factory: Callable[[str], object] | None = None) -> np.ndarray:
  """Token ids of one (corpus, split) [N], from the ``.npy`` cache or built (and cached) from the text.

  A cached array is reused when its sidecar's source sha256s match the files under ``root``, or when the
  corpora are not present at all (a carried cache). ``tokenizer`` (default: the SmolLM2 tokenizer from
  :mod:`dualform.tokenizer`, loaded only when a build is needed) must match ``tokenizer_name``.
  """
  spec = _get_spec(corpus, split)
  cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  array_path, sidecar_path = _cache_paths(cache_dir, corpus, split, tokenizer_name)
  root_path = pathlib.Path(root) if root is not None else corpora_dir()
  sources_present = (root_path / spec.folder).exists()
  if array_path.exists() and sidecar_path.exists() and not rebuild:
    sidecar = json.loads(sidecar_path.read_text())
    fresh = sidecar.get("format_version") == _FORMAT_VERSION and (
        not sources_present or sidecar["sources"] == _sha256_files(_source_files(spec, split, root_path)))
    if fresh:
      return np.load(array_path, mmap_mode="r")
  if not sources_present:
    raise ValueError(f"no cached tokens at {array_path} and no corpus folder {root_path / spec.folder}; "
                     "build the cache where the corpora exist (python -m dualform.data.corpus) and carry it")
  if tokenizer is None:
    tokenizer = (tokenizer_factory or _load_default_tokenizer)(tokenizer_name)
  tokens = tokenize_documents(tokenizer, read_documents(corpus, split, root_path))
  cache_dir.mkdir(parents=True, exist_ok=True)
  sidecar = dict(format_version=_FORMAT_VERSION, corpus=corpus, split=split, tokenizer=tokenizer_name,
                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), num_tokens=int(tokens.size),
                 dtype=str(tokens.dtype), end_of_text_id=END_OF_TEXT_ID,
                 sources=_sha256_files(_source_files(spec, split, root_path)))
  temporary = array_path.with_suffix(".tmp.npy")
  np.save(temporary, tokens)
  os.replace(temporary, array_path)
  temporary_sidecar = sidecar_path.with_suffix(".tmp")
  temporary_sidecar.write_text(json.dumps(sidecar, indent=1))
  os.replace(temporary_sidecar, sidecar_path)
  return np.load(array_path, mmap_mode="r")


def build_cache(corpora: Sequence[str], splits: Sequence[str], cache_dir: str | os.PathLike, *,
                tokenizer=None, tokenizer_name: str = "smollm2-135m") -> dict[str, int]:
  """Builds (or verifies) the cache for every existing (corpus, split); returns token counts by name."""
  counts = {}
  for corpus in corpora:
    for split in splits:
      if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; choose one of {sorted(CORPORA)}")
      if split not in CORPORA[corpus].splits:
        continue
      if tokenizer is None:
        tokenizer = _load_default_tokenizer(tokenizer_name)
      tokens = corpus_tokens(corpus, split, cache_dir=cache_dir, tokenizer=tokenizer, tokenizer_name=tokenizer_name)
      counts[f"{corpus}.{split}"] = int(tokens.size)
  return counts


class BlockStream:
  """Fixed-length training blocks in a seeded order that is a pure function of the step.

  The token array is cut into ``num_blocks = (N - 1) // block_len`` windows of ``block_len + 1`` tokens
  (inputs and shifted targets), window ``j`` starting at ``j * block_len``. Epoch ``e`` visits the windows in
  the order ``np.random.default_rng([seed, e]).permutation(num_blocks)``; the batch at step ``s`` holds the
  global window indices ``s * batch_size ... (s + 1) * batch_size - 1`` of that endless sequence. Restoring
  a run therefore only needs the step (``state()`` / ``from_state`` check the rest).
  """

  def __init__(self, tokens: np.ndarray, *, block_len: int, batch_size: int, seed: int):
    if block_len <= 0 or batch_size <= 0:
      raise ValueError(f"block_len and batch_size must be positive; got {block_len}, {batch_size}")
    self.tokens = tokens
    self.block_len, self.batch_size, self.seed = block_len, batch_size, seed
    self.num_blocks = (len(tokens) - 1) // block_len
    if self.num_blocks < 1:
      raise ValueError(f"{len(tokens)} tokens are too few for one block of {block_len + 1}; use a larger corpus")
    self._permutations: dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
    return self._permutations[epoch]

  def block_indices(self, step: int) -> np.ndarray:
    """Window indices of the batch at ``step`` [batch_size]."""
    global_index = step * self.batch_size + np.arange(self.batch_size)
    epochs, within = np.divmod(global_index, self.num_blocks)
    return np.array([self._permutation(int(epoch))[index] for epoch, index in zip(epochs, within)])

  def batch(self, step: int) -> np.ndarray:
    """int32 tokens [batch_size, block_len + 1] of the batch at ``step``."""
    starts = self.block_indices(step) * self.block_len
    return np.stack([np.asarray(self.tokens[start:start + self.block_len + 1]) for start in starts]).astype(np.int32)

  def epoch(self, step: int) -> float:
    return step * self.batch_size / self.num_blocks

  def state(self, step: int) -> dict:
    """The data position after ``step`` steps, saved beside a checkpoint."""
    return dict(step=int(step), seed=self.seed, block_len=self.block_len, batch_size=self.batch_size,
                num_blocks=self.num_blocks, epoch=self.epoch(step))

  def check_state(self, state: dict) -> int:
    """Checks a saved state matches this stream; returns the step to resume from."""
    for key in ("seed", "block_len", "batch_size", "num_blocks"):
      if state[key] != getattr(self, key):
        raise ValueError(f"checkpoint data stream has {key}={state[key]} but this run has {getattr(self, key)}; "
                         "resume with the same data config or use a fresh workdir")
    return int(state["step"])


def evaluation_blocks(tokens: np.ndarray, block_len: int, max_tokens: int | None = None) -> np.ndarray:
  """Non-overlapping windows [M, block_len + 1] over the first ``max_tokens + 1`` tokens (perplexity eval).

  Windows start at multiples of ``block_len``, so every length scores the same target tokens when
  ``max_tokens`` is a multiple of each ``block_len``.
  """
  usable = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
  count = usable // block_len
  if count < 1:
    raise ValueError(f"need at least {block_len + 1} tokens for one evaluation block; got {len(tokens)}")
  return np.stack([np.asarray(tokens[j * block_len:(j + 1) * block_len + 1]) for j in range(count)]).astype(np.int32)


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: ``python -m dualform.data.corpus --corpora gutenberg,wikitext-2-raw --splits train,valid --out DIR``."""
  import argparse
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--corpora", default="gutenberg,wikitext-2-raw")
  parser.add_argument("--splits", default="train,valid")
  parser.add_argument("--out", default=None, help="cache folder (default: $DUALFORM_CACHE/corpus)")
  parser.add_argument("--tokenizer", default="smollm2-135m")
  args = parser.parse_args(argv)
  cache = pathlib.Path(args.out) if args.out else default_cache_dir()
  counts = build_cache(args.corpora.split(","), args.splits.split(","), cache, tokenizer_name=args.tokenizer)
  for name, count in counts.items():
    print(f"{name}: {count} tokens")
  print(f"cache: {cache} ({sum(p.stat().st_size for p in cache.glob('*.npy')) / 2**20:.1f} MiB of .npy)")


if __name__ == "__main__":
  main()
