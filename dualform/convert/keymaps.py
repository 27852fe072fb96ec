"""Checkpoint key maps kept as data, and the one function that fills an abstract model through them.

A key map sends each source tensor name to a :class:`Target`: the ``nnx.state`` path it fills (as
``"layers/3/attn/q_proj/kernel"``), whether the PyTorch/GGUF ``[out, in]`` matrix is transposed into a Flax
``[in, out]`` kernel, and its role (``"param"``; ``"tied"``: must equal an already filled leaf, e.g. a stored
output projection of a tied model; ``"ignore"``: bookkeeping with no parameter, e.g. fairseq's dummy
``_float_tensor``).

Public names: :class:`Target`, :func:`gguf_llama_keymap`, :func:`hf_llama_keymap`, :func:`hf_xglm_keymap`,
:func:`fairseq_dense_keymap`, :func:`fill_model`, :func:`matching_named_config`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dualform.models.config import NAMED_CONFIGS, TransformerConfig
from dualform.models.transformer import Transformer, abstract_model

logger = logging.getLogger(__name__)


class Target(NamedTuple):
  """Where one source tensor goes: ``path`` in the parameter tree, ``transpose`` [out, in] -> [in, out]."""

  path: str
  transpose: bool = False
  role: str = "param"  # "param" | "tied" | "ignore"


IGNORE = Target("", False, "ignore")


def _per_layer(config: TransformerConfig, table: Mapping[str, Target]) -> dict[str, Target]:
  """Expands ``{i}`` in source names and target paths for every layer."""
  out = {}
  for layer in range(config.num_layers):
    for source, target in table.items():
      out[source.format(i=layer)] = target._replace(path=target.path.format(i=layer))
  return out


def gguf_llama_keymap(config: TransformerConfig) -> dict[str, Target]:
  """llama.cpp names (PROTOCOL.md §13.2); matrices dequantize to [out, in]. Q/K rows are un-permuted before."""
  keymap = {
      "token_embd.weight": Target("embed/embedding"),
      "output_norm.weight": Target("final_norm/scale"),
  }
  if not config.tie_embeddings:
    keymap["output.weight"] = Target("lm_head/kernel", True)
  keymap.update(_per_layer(config, {
      "blk.{i}.attn_norm.weight": Target("layers/{i}/attn_norm/scale"),
      "blk.{i}.attn_q.weight": Target("layers/{i}/attn/q_proj/kernel", True),
      "blk.{i}.attn_k.weight": Target("layers/{i}/attn/k_proj/kernel", True),
      "blk.{i}.attn_v.weight": Target("layers/{i}/attn/v_proj/kernel", True),
      "blk.{i}.attn_output.weight": Target("layers/{i}/attn/o_proj/kernel", True),
      "blk.{i}.ffn_norm.weight": Target("layers/{i}/mlp_norm/scale"),
      "blk.{i}.ffn_gate.weight": Target("layers/{i}/mlp/gate_proj/kernel", True),
      "blk.{i}.ffn_up.weight": Target("layers/{i}/mlp/up_proj/kernel", True),
      "blk.{i}.ffn_down.weight": Target("layers/{i}/mlp/down_proj/kernel", True),
  }))
  return keymap


def hf_llama_keymap(config: TransformerConfig) -> dict[str, Target]:
  """``LlamaForCausalLM`` safetensors names; ``lm_head.weight`` is tied-checked when embeddings are tied."""
  keymap = {
      "model.embed_tokens.weight": Target("embed/embedding"),
      "model.norm.weight": Target("final_norm/scale"),
      "lm_head.weight": (Target("embed/embedding", False, "tied") if config.tie_embeddings
                         else Target("lm_head/kernel", True)),
  }
  keymap.update(_per_layer(config, {
      "model.layers.{i}.input_layernorm.weight": Target("layers/{i}/attn_norm/scale"),
      "model.layers.{i}.self_attn.q_proj.weight": Target("layers/{i}/attn/q_proj/kernel", True),
      "model.layers.{i}.self_attn.k_proj.weight": Target("layers/{i}/attn/k_proj/kernel", True),
      "model.layers.{i}.self_attn.v_proj.weight": Target("layers/{i}/attn/v_proj/kernel", True),
      "model.layers.{i}.self_attn.o_proj.weight": Target("layers/{i}/attn/o_proj/kernel", True),
      "model.layers.{i}.self_attn.rotary_emb.inv_freq": IGNORE,  # a buffer some old saves carry
      "model.layers.{i}.post_attention_layernorm.weight": Target("layers/{i}/mlp_norm/scale"),
      "model.layers.{i}.mlp.gate_proj.weight": Target("layers/{i}/mlp/gate_proj/kernel", True),
      "model.layers.{i}.mlp.up_proj.weight": Target("layers/{i}/mlp/up_proj/kernel", True),
      "model.layers.{i}.mlp.down_proj.weight": Target("layers/{i}/mlp/down_proj/kernel", True),
  }))
  return keymap


def _dense_layer_table(prefix: str, out_proj: str) -> dict[str, Target]:
  table = {}
  for ours, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", out_proj)):
    table[f"{prefix}.self_attn.{theirs}.weight"] = Target(f"layers/{{i}}/attn/{ours}/kernel", True)
    table[f"{prefix}.self_attn.{theirs}.bias"] = Target(f"layers/{{i}}/attn/{ours}/bias")
  for ours, theirs in (("attn_norm", "self_attn_layer_norm"), ("mlp_norm", "final_layer_norm")):
    table[f"{prefix}.{theirs}.weight"] = Target(f"layers/{{i}}/{ours}/scale")
    table[f"{prefix}.{theirs}.bias"] = Target(f"layers/{{i}}/{ours}/bias")
  for fc in ("fc1", "fc2"):
    table[f"{prefix}.{fc}.weight"] = Target(f"layers/{{i}}/mlp/{fc}/kernel", True)
    table[f"{prefix}.{fc}.bias"] = Target(f"layers/{{i}}/mlp/{fc}/bias")
  return table


def hf_xglm_keymap(config: TransformerConfig) -> dict[str, Target]:
  """``XGLMForCausalLM`` names (the published ports of the fairseq dense models); output tied to the input."""
  keymap = {
      "model.embed_tokens.weight": Target("embed/embedding"),
      "model.embed_positions.weights": IGNORE,  # sinusoidal table, recomputed
      "model.layer_norm.weight": Target("final_norm/scale"),
      "model.layer_norm.bias": Target("final_norm/bias"),
      "lm_head.weight": Target("embed/embedding", False, "tied"),
  }
  keymap.update(_per_layer(config, _dense_layer_table("model.layers.{i}", "out_proj")))
  return keymap


def fairseq_dense_keymap(config: TransformerConfig) -> dict[str, Target]:
  """fairseq ``model.pt["model"]`` names (PROTOCOL.md §12.3)."""
  keymap = {
      "decoder.version": IGNORE,
      "decoder.embed_tokens.weight": Target("embed/embedding"),
      "decoder.embed_positions._float_tensor": IGNORE,  # dummy; the table is computed
      "decoder.output_projection.weight": Target("embed/embedding", False, "tied"),
      "decoder.layer_norm.weight": Target("final_norm/scale"),
      "decoder.layer_norm.bias": Target("final_norm/bias"),
  }
  keymap.update(_per_layer(config, _dense_layer_table("decoder.layers.{i}", "out_proj")))
  return keymap


def _path_string(path: tuple) -> str:
  return "/".join(str(part) for part in path)


def fill_model(config: TransformerConfig, names: Iterable[str], read: Callable[[str], np.ndarray],
               keymap: Mapping[str, Target], *, source: str = "checkpoint") -> Transformer:
  """Builds ``Transformer(config)`` abstractly and fills every leaf from ``read(name)`` through ``keymap``.

  Each array is read once (lazily), transposed where the map says so, checked against the target shape,
  and cast to the target dtype (only from a floating source). Raises ValueError on unknown source names,
  non-floating tensors, shape mismatches, tied tensors that differ, and leaves left unfilled.
  """
  names = list(names)
  unknown = [name for name in names if name not in keymap]
  if unknown:
    raise ValueError(f"{source}: {len(unknown)} tensor(s) the port does not map, e.g. {unknown[:4]}; "
                     "the checkpoint's architecture differs from the config")
  graphdef, state = nnx.split(abstract_model(config))
  leaves = {_path_string(path): variable for path, variable in nnx.to_flat_state(state)}
  values: dict[str, jnp.ndarray] = {}
  tied: list[tuple[str, Target]] = []
  transposed = []
  for name in names:
    target = keymap[name]
    if target.role == "ignore":
      continue
    if target.role == "tied":
      tied.append((name, target))
      continue
    if target.path not in leaves:
      raise ValueError(f"{source}: {name} maps to {target.path}, which the model {config.name!r} does not have")
    if target.path in values:
      raise ValueError(f"{source}: two tensors fill {target.path}; the key map is inconsistent")
    array = _prepare(name, read(name), target, source)
    expected = leaves[target.path].get_value()
    if array.shape != tuple(expected.shape):
      raise ValueError(f"{source}: {name} has shape {array.shape} (after transpose={target.transpose}) but "
                       f"{target.path} needs {tuple(expected.shape)}; check the config")
    if target.transpose:
      transposed.append(name)
    values[target.path] = jnp.asarray(array, dtype=expected.dtype)
  missing = sorted(set(leaves) - set(values))
  if missing:
    raise ValueError(f"{source}: {len(missing)} parameter(s) left unfilled, e.g. {missing[:4]}; the checkpoint "
                     "lacks tensors the config needs")
  for name, target in tied:
    array = _prepare(name, read(name), target, source)
    if not np.array_equal(np.asarray(array, np.float32), np.asarray(values[target.path], np.float32)):
      raise ValueError(f"{source}: {name} differs from {target.path}, but the config ties them; load it untied")
  logger.debug("%s: transposed [out, in] -> [in, out]: %s", source, ", ".join(transposed))
  flat = [(path, variable.replace(values[_path_string(path)])) for path, variable in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _prepare(name: str, array, target: Target, source: str) -> np.ndarray:
  array = np.asarray(array)
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise ValueError(f"{source}: {name} has dtype {array.dtype}, not a floating type; is it quantized?")
  if target.transpose:
    if array.ndim != 2:
      raise ValueError(f"{source}: {name} should be a matrix to transpose; got shape {array.shape}")
    array = array.T
  return array


def matching_named_config(config: TransformerConfig) -> str | None:
  """Name of the size-table entry with the same shapes (family, vocab, layers, widths), or None.

  Raises ValueError when the shapes match but the head counts differ (head count is invisible in shapes).
  """
  for name, named in NAMED_CONFIGS.items():
    same_shapes = (named.family == config.family and named.vocab_size == config.vocab_size
                   and named.num_layers == config.num_layers and named.embed_dim == config.embed_dim
                   and named.mlp_dim == config.mlp_dim
                   and named.num_kv_heads * named.head_dim == config.num_kv_heads * config.head_dim)
    if not same_shapes:
      continue
    if (named.num_heads, named.num_kv_heads, named.head_dim) != (config.num_heads, config.num_kv_heads,
                                                                 config.head_dim):
      raise ValueError(f"checkpoint shapes match {name!r} but its heads {config.num_heads}/{config.num_kv_heads} "
                       f"differ from the size table's {named.num_heads}/{named.num_kv_heads}")
    return name
  return None
