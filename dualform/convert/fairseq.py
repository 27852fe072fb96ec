"""fairseq dense LM checkpoints (``model.pt`` with ``model`` and ``cfg``) -> Transformer, without fairseq.

The file is read with ``torch.load(map_location="cpu", weights_only=True)``; a checkpoint that needs full
unpickling (e.g. an omegaconf ``cfg``) is refused unless ``trust_pickle=True`` is passed, which is logged.
``cfg["model"]`` (or the legacy ``args``), the size table (head counts) and the tensor shapes are
cross-checked, then the state dict (PROTOCOL.md §12.3) fills an abstract model through
:func:`dualform.convert.keymaps.fairseq_dense_keymap`. torch is optional: imported only here.

Public names: :func:`read_checkpoint`, :func:`fairseq_config`, :func:`load_fairseq`,
:func:`load_fairseq_pretrained`, :data:`STANDARD_DICT_MD5`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
from typing import Any

import numpy as np

from dualform import tokenizer as tokenizer_lib
from dualform.convert.keymaps import fairseq_dense_keymap, fill_model, matching_named_config
from dualform.models.config import TransformerConfig
from dualform.models.transformer import Transformer

logger = logging.getLogger(__name__)

STANDARD_DICT_MD5 = "087f4e25711bac8e3a3f98416fd3f895"  # PROTOCOL.md §12.4
# cfg["model"] fields with the only value this port implements (checked when present).
REQUIRED_MODEL_FIELDS = {
    "activation_fn": "gelu",
    "decoder_normalize_before": True,
    "no_scale_embedding": False,
    "layernorm_embedding": False,
    "decoder_learned_pos": False,
    "no_token_positional_embeddings": False,
    "share_decoder_input_output_embed": True,
    "adaptive_softmax_cutoff": None,
    "decoder_layers_to_keep": None,
    "quant_noise_pq": 0,
}


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("reading fairseq .pt checkpoints needs torch; run `pip install torch` "
                      "(CPU wheel is enough)") from error
  return torch


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, Any]:
  """The checkpoint dict, loaded with ``weights_only=True`` unless ``trust_pickle`` (logged)."""
  torch = _torch()
  try:
    return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  except Exception as error:  # pylint: disable=broad-except
    if not trust_pickle:
      first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
      raise ValueError(f"{path} cannot be read with weights_only=True ({first_line[:160]}); if you trust the "
                       "file, pass trust_pickle=True to unpickle it fully") from error
  logger.warning("unpickling %s with weights_only=False because trust_pickle=True was passed", path)
  return torch.load(os.fspath(path), map_location="cpu", weights_only=False)


def _model_cfg(checkpoint: dict[str, Any]) -> Any:
  cfg = checkpoint.get("cfg")
  if cfg is not None:
    model_cfg = cfg.get("model") if hasattr(cfg, "get") else getattr(cfg, "model", None)
    if model_cfg is not None:
      return model_cfg
  return checkpoint.get("args")


def _cfg_get(model_cfg: Any, key: str) -> Any:
  if model_cfg is None:
    return None
  if isinstance(model_cfg, dict):
    return model_cfg.get(key)
  return getattr(model_cfg, key, None)


def fairseq_config(state: dict[str, Any], model_cfg: Any, *, dtype: str = "float32",
                   source: str = "model.pt") -> TransformerConfig:
  """The config of a fairseq dense state dict, cross-checked against ``cfg["model"]`` and the size table."""
  if "decoder.embed_tokens.weight" not in state:
    raise ValueError(f"{source}: no decoder.embed_tokens.weight; not a fairseq decoder-only LM state dict")
  for key, wanted in REQUIRED_MODEL_FIELDS.items():
    value = _cfg_get(model_cfg, key)
    if value is not None and value != wanted and not (wanted is None and value in ("", "0")):
      raise ValueError(f"{source}: cfg model.{key} = {value!r}; this port handles only {wanted!r}")
  vocab_size, embed_dim = (int(d) for d in state["decoder.embed_tokens.weight"].shape)
  layer_ids = {int(m.group(1)) for key in state if (m := re.match(r"decoder\.layers\.(\d+)\.", key))}
  num_layers = len(layer_ids)
  if layer_ids != set(range(num_layers)):
    raise ValueError(f"{source}: layer indices {sorted(layer_ids)} are not 0..{num_layers - 1}")
  mlp_dim = int(state["decoder.layers.0.fc1.weight"].shape[0])
  declared = dict(decoder_layers=num_layers, decoder_embed_dim=embed_dim, decoder_ffn_embed_dim=mlp_dim)
  for key, from_shapes in declared.items():
    value = _cfg_get(model_cfg, key)
    if value is not None and int(value) != from_shapes:
      raise ValueError(f"{source}: cfg model.{key} = {value} but the tensors give {from_shapes}")
  for key in ("decoder_input_dim", "decoder_output_dim"):
    value = _cfg_get(model_cfg, key)
    if value is not None and int(value) != embed_dim:
      raise ValueError(f"{source}: cfg model.{key} = {value} differs from the embedding width {embed_dim}")
  heads = _cfg_get(model_cfg, "decoder_attention_heads")
  max_len = _cfg_get(model_cfg, "max_target_positions") or _cfg_get(model_cfg, "tokens_per_sample") or 2048
  config = TransformerConfig(name="fairseq", family="fairseq_dense", vocab_size=vocab_size, num_layers=num_layers,
                             embed_dim=embed_dim, num_heads=int(heads or 1), num_kv_heads=int(heads or 1),
                             head_dim=embed_dim // int(heads or 1), mlp_dim=mlp_dim, max_len=int(max_len),
                             norm_eps=1e-5, padding_idx=1, dtype=dtype, param_dtype=dtype)
  if heads is None:
    # Head count is invisible in shapes: take it from the size table or refuse.
    for named_heads in range(1, embed_dim + 1):
      if embed_dim % named_heads:
        continue
      candidate = config.replace(num_heads=named_heads, num_kv_heads=named_heads, head_dim=embed_dim // named_heads)
      try:
        name = matching_named_config(candidate)
      except ValueError:
        continue
      if name is not None:
        logger.info("%s: cfg has no decoder_attention_heads; using %d from the size table (%s)", source,
                    named_heads, name)
        return candidate.replace(name=name)
    raise ValueError(f"{source}: cfg has no decoder_attention_heads and the shapes match no size-table entry; "
                     "the head count cannot be inferred")
  name = matching_named_config(config)
  return config.replace(name=name or "fairseq")


def load_fairseq(path: str | os.PathLike, *, dtype: str = "float32",
                 trust_pickle: bool = False) -> tuple[Transformer, dict[str, Any]]:
  """Loads a fairseq dense ``model.pt``; returns ``(model, info)``."""
  torch = _torch()
  checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
  if not isinstance(checkpoint, dict) or "model" not in checkpoint:
    raise ValueError(f"{path} has no 'model' entry; expected a fairseq checkpoint dict with 'model' and 'cfg'")
  state = checkpoint["model"]
  config = fairseq_config(state, _model_cfg(checkpoint), dtype=dtype, source=os.fspath(path))

  def read(key: str) -> np.ndarray:
    tensor = state[key]
    if tensor.is_floating_point():
      return tensor.detach().to(torch.float32).numpy()
    return tensor.detach().numpy()

  model = fill_model(config, state, read, fairseq_dense_keymap(config), source=os.fspath(path))
  info = dict(format="fairseq_pt", config=config.name, trust_pickle=trust_pickle)
  return model, info


def load_fairseq_pretrained(path: str | os.PathLike, *, dtype: str = "float32", trust_pickle: bool = False):
  """``(model, tokenizer, info)``: ``dict.txt`` beside the checkpoint, else the shared one."""
  from dualform.loading import file_sha256  # pylint: disable=import-outside-toplevel

  path = pathlib.Path(path)
  model, port_info = load_fairseq(path, dtype=dtype, trust_pickle=trust_pickle)
  dictionary = path.parent / "dict.txt"
  if not dictionary.is_file():
    dictionary = tokenizer_lib.gpt2_bpe_dir() / "dict.txt"
  tokenizer = tokenizer_lib.FairseqGPT2Tokenizer.from_files(dictionary=dictionary)
  if tokenizer.vocab_size != model.config.vocab_size:
    raise ValueError(f"{dictionary} gives {tokenizer.vocab_size} entries but the model has "
                     f"{model.config.vocab_size} embedding rows; use the checkpoint's own dict.txt")
  dict_md5 = hashlib.md5(dictionary.read_bytes()).hexdigest()
  if dict_md5 != STANDARD_DICT_MD5:
    logger.warning("%s has md5 %s, not the standard GPT-2 fairseq dictionary %s", dictionary, dict_md5,
                   STANDARD_DICT_MD5)
  info = dict(source=str(path), sha256=file_sha256(path), format="fairseq_pt", quantization=None, dtype=dtype,
              config=port_info["config"], dictionary=str(dictionary), dictionary_md5=dict_md5,
              trust_pickle=trust_pickle)
  return model, tokenizer, info
