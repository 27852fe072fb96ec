"""Hugging Face safetensors checkpoints (``XGLMForCausalLM``, ``LlamaForCausalLM``) -> Transformer.

Reads ``config.json``, refuses attributes this port does not implement (RoPE scaling, biases in Llama,
non-erf activations, embedding LayerNorm, unscaled embeddings, ...), maps it to a :class:`TransformerConfig`,
and fills an abstract model lazily from ``*.safetensors`` (one tensor at a time) through the key maps of
:mod:`dualform.convert.keymaps`.

* XGLM (the published ports of the fairseq dense models): sinusoidal positions with offset 2
  (``pad_token_id`` must be 1), ``scale_embedding`` true, exact GELU, LayerNorm eps 1e-5, tied output.
* Llama: RMSNorm, SwiGLU, rotate-half RoPE (``rope_type`` default), GQA, tied or untied head.

Public names: :func:`read_hf_config`, :func:`load_hf`, :func:`load_hf_pretrained`, :data:`SUPPORTED_ARCHITECTURES`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import numpy as np

from dualform import tokenizer as tokenizer_lib
from dualform.convert.keymaps import fill_model, hf_llama_keymap, hf_xglm_keymap, matching_named_config
from dualform.models.config import TransformerConfig
from dualform.models.transformer import Transformer

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("XGLMForCausalLM", "LlamaForCausalLM")
_XGLM_LAYERNORM_EPS = 1e-5  # nn.LayerNorm default in modeling_xglm.py; not a config attribute


def _refuse(condition: bool, message: str) -> None:
  if condition:
    raise ValueError(message)


def _model_type(raw: dict[str, Any]) -> str:
  architectures = raw.get("architectures") or []
  model_type = raw.get("model_type")
  if model_type == "xglm" or "XGLMForCausalLM" in architectures:
    return "xglm"
  if model_type == "llama" or "LlamaForCausalLM" in architectures:
    return "llama"
  raise ValueError(f"config.json describes {architectures or model_type!r}; supported: {SUPPORTED_ARCHITECTURES}")


def _xglm_config(raw: dict[str, Any], name: str, dtype: str) -> TransformerConfig:
  _refuse(raw.get("activation_function", "gelu") != "gelu",
          f"XGLM activation {raw.get('activation_function')!r} is not exact GELU ('gelu')")
  _refuse(not raw.get("scale_embedding", True), "XGLM scale_embedding is false; the fairseq port scales by sqrt(d)")
  _refuse(raw.get("pad_token_id", 1) != 1,
          f"XGLM pad_token_id {raw.get('pad_token_id')} != 1: positions would not start at 2")
  _refuse(not raw.get("tie_word_embeddings", True), "XGLM with untied output embeddings is not supported")
  for key in ("layernorm_embedding", "add_cross_attention", "is_encoder_decoder"):
    _refuse(bool(raw.get(key)), f"XGLM config sets {key}, which this port does not handle")
  heads = int(raw["attention_heads"])
  return TransformerConfig(
      name=name, family="fairseq_dense", vocab_size=int(raw["vocab_size"]), num_layers=int(raw["num_layers"]),
      embed_dim=int(raw["d_model"]), num_heads=heads, num_kv_heads=heads, head_dim=int(raw["d_model"]) // heads,
      mlp_dim=int(raw["ffn_dim"]), max_len=int(raw.get("max_position_embeddings", 2048)),
      norm_eps=_XGLM_LAYERNORM_EPS, padding_idx=1, tie_embeddings=True, dtype=dtype, param_dtype=dtype)


def _llama_config(raw: dict[str, Any], name: str, dtype: str) -> TransformerConfig:
  _refuse(raw.get("hidden_act", "silu") != "silu", f"Llama hidden_act {raw.get('hidden_act')!r} is not 'silu'")
  _refuse(bool(raw.get("attention_bias")), "Llama config sets attention_bias; biases are not supported")
  _refuse(bool(raw.get("mlp_bias")), "Llama config sets mlp_bias; biases are not supported")
  _refuse(raw.get("rope_scaling") not in (None, {}), f"Llama rope_scaling {raw.get('rope_scaling')} is not supported")
  rope = raw.get("rope_parameters") or {}
  _refuse(rope.get("rope_type", "default") != "default", f"Llama rope_type {rope.get('rope_type')!r} is not supported")
  _refuse(rope.get("partial_rotary_factor", 1.0) != 1.0, "partial rotary embeddings are not supported")
  _refuse(raw.get("pretraining_tp", 1) != 1, "Llama pretraining_tp != 1 is not supported")
  theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
  heads = int(raw["num_attention_heads"])
  kv_heads = int(raw.get("num_key_value_heads") or heads)
  head_dim = int(raw.get("head_dim") or int(raw["hidden_size"]) // heads)
  return TransformerConfig(
      name=name, family="llama", vocab_size=int(raw["vocab_size"]), num_layers=int(raw["num_hidden_layers"]),
      embed_dim=int(raw["hidden_size"]), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=int(raw["intermediate_size"]), max_len=int(raw.get("max_position_embeddings", 2048)),
      norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      tie_embeddings=bool(raw.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype)


def read_hf_config(directory: str | os.PathLike, *, dtype: str = "float32") -> tuple[TransformerConfig, str]:
  """``(config, model_type)`` from ``directory/config.json``; the name comes from the size table when the
  shapes match one of its entries (head counts cross-checked), else ``"hf:<directory name>"``."""
  directory = pathlib.Path(directory)
  raw = json.loads((directory / "config.json").read_text())
  model_type = _model_type(raw)
  build = _xglm_config if model_type == "xglm" else _llama_config
  config = build(raw, f"hf:{directory.name}", dtype)
  named = matching_named_config(config)
  if named is not None:
    config = config.replace(name=named)
  return config, model_type


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [directory / f for f in files]
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise ValueError(f"no *.safetensors in {directory}; save the model with safe_serialization=True")
  return files


def load_hf(directory: str | os.PathLike, *, dtype: str = "float32") -> tuple[Transformer, dict[str, Any]]:
  """Loads an XGLM or Llama safetensors directory; returns ``(model, info)``."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  directory = pathlib.Path(directory)
  config, model_type = read_hf_config(directory, dtype=dtype)
  keymap = hf_xglm_keymap(config) if model_type == "xglm" else hf_llama_keymap(config)
  handles = {}
  where = {}
  for path in _safetensors_files(directory):
    handle = safe_open(str(path), framework="flax")  # "flax" reads bfloat16 too; numpy does not
    handles[path] = handle
    for key in handle.keys():
      if key in where:
        raise ValueError(f"{key} appears in both {where[key].name} and {path.name}")
      where[key] = path

  def read(key: str) -> np.ndarray:
    return np.asarray(handles[where[key]].get_tensor(key))

  model = fill_model(config, where, read, keymap, source=str(directory))
  info = dict(format="hf_safetensors", architecture=model_type, config=config.name,
              files=[path.name for path in handles])
  return model, info


def _hf_tokenizer(directory: pathlib.Path, model_type: str, config: TransformerConfig) -> tokenizer_lib.Tokenizer:
  if (directory / tokenizer_lib.METADATA_FILE).is_file():
    return tokenizer_lib.load_tokenizer(directory)
  raw = json.loads((directory / "config.json").read_text())
  if model_type == "xglm":
    if (directory / "dict.txt").is_file() or config.vocab_size == 51200:
      return tokenizer_lib.FairseqGPT2Tokenizer.from_files(
          dictionary=directory / "dict.txt" if (directory / "dict.txt").is_file() else None)
    if (directory / "tokenizer.json").is_file():
      # fairseq layout: <s> (bos_token_id) first, </s> (eos_token_id) after each demonstration.
      return tokenizer_lib.ByteLevelBPETokenizer.from_file(
          directory / "tokenizer.json", name=directory.name, bos_id=raw.get("bos_token_id", 0),
          separator_id=raw.get("eos_token_id", 2))
  elif (directory / "tokenizer.json").is_file():
    return tokenizer_lib.load_tokenizer(directory)
  elif config.vocab_size == 49152:
    logger.warning("%s has no tokenizer.json; using the SmolLM2 tokenizer for its 49152-id vocabulary", directory)
    return tokenizer_lib.load_tokenizer("smollm2")
  raise ValueError(f"{directory} has no tokenizer.json (or dict.txt for XGLM); add the checkpoint's tokenizer")


def load_hf_pretrained(directory: str | os.PathLike, *, dtype: str = "float32"):
  """``(model, tokenizer, info)`` for :func:`dualform.loading.load_pretrained`."""
  from dualform.loading import file_sha256  # pylint: disable=import-outside-toplevel

  directory = pathlib.Path(directory)
  model, port_info = load_hf(directory, dtype=dtype)
  tokenizer = _hf_tokenizer(directory, port_info["architecture"], model.config)
  if tokenizer.vocab_size > model.config.vocab_size:
    raise ValueError(f"{directory}: tokenizer has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}")
  hashes = {name: file_sha256(directory / name) for name in port_info["files"]}
  sha256 = next(iter(hashes.values())) if len(hashes) == 1 else hashes
  info = dict(source=str(directory), sha256=sha256, format="hf_safetensors", quantization=None, dtype=dtype,
              config=port_info["config"], architecture=port_info["architecture"])
  return model, tokenizer, info
