"""GGUF (llama.cpp) Llama-family checkpoints -> :class:`~dualform.models.transformer.Transformer`.

Reads the config from ``llama.*`` metadata, dequantizes every tensor to float32 with
``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0, Q4_1, Q5_x, Q8_0, K-quants: whatever the ``gguf`` package
supports), undoes llama.cpp's Q/K row permutation (PROTOCOL.md §13.2; ``n = num_kv_heads`` for K), ties the
output head to ``token_embd`` when ``output.weight`` is absent, and records ``general.file_type`` and the
per-tensor type counts.

Public names: :func:`read_gguf_config`, :func:`unpermute_rows`, :func:`permute_rows`, :func:`load_gguf`,
:func:`gguf_quantization`, :data:`UNHANDLED_METADATA`.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import numpy as np

from dualform.convert.keymaps import fill_model, gguf_llama_keymap, matching_named_config
from dualform.models.config import TransformerConfig
from dualform.models.transformer import Transformer

logger = logging.getLogger(__name__)

# Metadata that changes the computation in ways this port does not implement: refused when present.
UNHANDLED_METADATA = ("llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.expert_count",
                      "llama.attention.clamp_kqv", "llama.attention.layer_norm_epsilon", "llama.logit_scale")


def _reader(path_or_reader):
  import gguf  # pylint: disable=import-outside-toplevel
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  return gguf.GGUFReader(os.fspath(path_or_reader))


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def read_gguf_config(path_or_reader, *, name: str | None = None, dtype: str = "float32") -> TransformerConfig:
  """The :class:`TransformerConfig` described by a GGUF's ``llama.*`` metadata (ValueError if unsupported)."""
  reader = _reader(path_or_reader)
  architecture = _field(reader, "general.architecture")
  if architecture != "llama":
    raise ValueError(f"GGUF general.architecture is {architecture!r}; only 'llama' is supported")
  present = [key for key in UNHANDLED_METADATA if key in reader.fields]
  if present:
    raise ValueError(f"GGUF sets {present}, which this port does not handle")

  def required(key):
    value = _field(reader, key)
    if value is None:
      raise ValueError(f"GGUF metadata lacks {key}; is this a llama-architecture file?")
    return value

  tensors = {tensor.name: tensor for tensor in reader.tensors}
  embed_dim = int(required("llama.embedding_length"))
  num_heads = int(required("llama.attention.head_count"))
  num_kv_heads = int(_field(reader, "llama.attention.head_count_kv", num_heads))
  head_dim = embed_dim // num_heads
  for key in ("llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"):
    value = _field(reader, key)
    if value is not None and int(value) != head_dim:
      raise ValueError(f"GGUF {key} = {value} differs from embedding_length / head_count = {head_dim}; "
                       "partial RoPE and odd head sizes are not supported")
  vocab_size = _field(reader, "llama.vocab_size")
  if vocab_size is None:
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
  eps = float(required("llama.attention.layer_norm_rms_epsilon"))
  config = TransformerConfig(
      name=name or "gguf", family="llama", vocab_size=int(vocab_size), num_layers=int(required("llama.block_count")),
      embed_dim=embed_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      mlp_dim=int(required("llama.feed_forward_length")), max_len=int(required("llama.context_length")),
      # eps is stored as float32; round to the float64 it was written from (1e-5 -> 9.99999974e-06).
      norm_eps=float(np.format_float_positional(np.float32(eps), unique=True)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in tensors, dtype=dtype, param_dtype=dtype)
  if name is None:
    config = config.replace(name=matching_named_config(config) or "gguf")
  else:
    matching_named_config(config)  # cross-checks head counts against the size table
  return config


def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's ``LlamaModel.permute`` of a [rows, in] Q or K matrix: rotate-half -> interleaved pairs.

  ``w.reshape(n, 2, rows / n / 2, in).swapaxes(1, 2).reshape(rows, in)``.
  """
  rows = weight.shape[0]
  return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of :func:`permute_rows`: ``w.reshape(n, rows / n / 2, 2, in).swapaxes(1, 2).reshape(rows, in)``."""
  rows = weight.shape[0]
  if rows % (2 * num_heads):
    raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads of even size")
  return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor) -> np.ndarray:
  """A ``ReaderTensor`` as float32 in PyTorch layout ([out, in] for matrices)."""
  import gguf  # pylint: disable=import-outside-toplevel
  kind = gguf.GGMLQuantizationType(tensor.tensor_type)
  if kind == gguf.GGMLQuantizationType.F32:
    array = np.asarray(tensor.data, np.float32)
  elif kind == gguf.GGMLQuantizationType.F16:
    array = np.asarray(tensor.data).astype(np.float32)
  else:
    try:
      array = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError as error:
      raise ValueError(f"GGUF tensor {tensor.name} has type {kind.name}, which gguf cannot dequantize") from error
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
  return np.asarray(array, np.float32).reshape(shape)


def gguf_quantization(path_or_reader) -> dict[str, Any]:
  """``general.file_type`` (number and llama.cpp name) and the count of tensors per type."""
  import gguf  # pylint: disable=import-outside-toplevel
  reader = _reader(path_or_reader)
  file_type = _field(reader, "general.file_type")
  try:
    file_type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else None
  except ValueError:
    file_type_name = None
  counts = collections.Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
  return dict(file_type=None if file_type is None else int(file_type), file_type_name=file_type_name,
              tensor_types=dict(sorted(counts.items())))


def load_gguf(path_or_reader, *, dtype: str = "float32", name: str | None = None) -> tuple[Transformer, dict]:
  """Loads a llama GGUF into a Transformer; returns ``(model, info)`` with config name and quantization."""
  reader = _reader(path_or_reader)
  config = read_gguf_config(reader, name=name, dtype=dtype)
  tensors = {tensor.name: tensor for tensor in reader.tensors}
  if "output.weight" not in tensors:
    logger.info("GGUF has no output.weight: the output head is tied to token_embd")

  def read(tensor_name: str) -> np.ndarray:
    array = dequantize_tensor(tensors[tensor_name])
    if tensor_name.endswith(".attn_q.weight"):
      array = unpermute_rows(array, config.num_heads)
    elif tensor_name.endswith(".attn_k.weight"):
      array = unpermute_rows(array, config.num_kv_heads)
    return array

  model = fill_model(config, tensors, read, gguf_llama_keymap(config), source="gguf")
  info = dict(format="gguf", config=config.name, **gguf_quantization(reader))
  return model, info
