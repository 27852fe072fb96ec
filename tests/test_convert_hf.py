"""HF safetensors port: parity with tiny random XGLM / Llama (tied and untied, GQA) and loud failures."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualform.convert import hf as hf_port
from dualform.models import RecordSpec

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.needs_ref

TOKENS = np.array([[5, 17, 3, 42, 8, 91, 60, 2, 33, 77, 11],
                   [40, 4, 64, 9, 1, 0, 12, 18, 95, 7, 26]], np.int32)


def reference_outputs(model, tokens):
  """HF logits [B, T, V] and per-layer ``self_attn`` outputs [B, T, D] (the SimAOU vectors)."""
  outputs, hooks = [], []
  for layer in model.model.layers:
    hooks.append(layer.self_attn.register_forward_hook(
        lambda _module, _inputs, output: outputs.append((output[0] if isinstance(output, tuple) else output)
                                                        .detach().numpy())))
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  for hook in hooks:
    hook.remove()
  return logits, outputs


def ours(model, tokens):
  batch, seq = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  with jax.default_matmul_precision("highest"):
    out = model.forward(jnp.asarray(tokens), record=RecordSpec(attn_out=True), record_positions=positions)
  return np.asarray(out.logits), [np.asarray(r["attn_out"]) for r in out.records]


def relative_error(actual, expected):
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def assert_parity(model, reference, tokens=TOKENS):
  ref_logits, ref_attn = reference_outputs(reference, tokens)
  logits, attn = ours(model, tokens)
  assert logits.shape == ref_logits.shape
  assert relative_error(logits, ref_logits) <= 1e-4
  assert len(attn) == len(ref_attn)
  for layer, (a, b) in enumerate(zip(attn, ref_attn)):
    assert relative_error(a, b) <= 1e-4, f"layer {layer}"


@pytest.mark.parametrize("tie", [True, False])
def test_llama_parity(tmp_path, tiny_hf_llama, tie):
  reference = tiny_hf_llama(tie=tie)
  reference.save_pretrained(tmp_path)
  model, info = hf_port.load_hf(tmp_path)
  assert info["architecture"] == "llama"
  assert model.config.tie_embeddings == tie
  assert (model.config.num_heads, model.config.num_kv_heads) == (4, 2)
  assert hasattr(model, "lm_head") != tie
  assert_parity(model, reference)


def test_xglm_parity(tmp_path, tiny_hf_xglm):
  reference = tiny_hf_xglm()
  reference.save_pretrained(tmp_path)
  model, info = hf_port.load_hf(tmp_path)
  assert info["architecture"] == "xglm"
  assert model.config.family == "fairseq_dense" and model.config.first_position == 2
  assert_parity(model, reference)


def test_xglm_parity_with_cache_and_positions(tmp_path, tiny_hf_xglm):
  """The prefix cache path gives the HF logits of the full sequence (positions continue from the prefix)."""
  reference = tiny_hf_xglm(seed=3)
  reference.save_pretrained(tmp_path)
  model, _ = hf_port.load_hf(tmp_path)
  ref_logits, _ = reference_outputs(reference, TOKENS[:1])
  with jax.default_matmul_precision("highest"):
    cache = model.encode_prefix(jnp.asarray(TOKENS[:1, :6]))
    logits = np.asarray(model.forward(jnp.asarray(TOKENS[:1, 6:]), cache=cache).logits)
  assert relative_error(logits, ref_logits[:, 6:]) <= 1e-4


def test_load_pretrained_hf_directory(tmp_path, tiny_hf_llama, smollm2_tokenizer):
  from dualform.loading import load_pretrained
  reference = tiny_hf_llama(vocab_size=49152)
  reference.save_pretrained(tmp_path)
  smollm2_tokenizer.save(tmp_path)
  pretrained = load_pretrained(tmp_path)
  assert pretrained.info["format"] == "hf_safetensors"
  assert len(pretrained.info["sha256"]) == 64
  assert pretrained.tokenizer.separator_id == 198 and pretrained.tokenizer.bos_id is None
  ids = np.array([pretrained.tokenizer.encode("The movie was great")], np.int32)
  assert_parity(pretrained.model, reference, ids)


def _edit_config(directory, **changes):
  path = directory / "config.json"
  config = json.loads(path.read_text())
  config.update(changes)
  path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(intermediate_size=96), "shape"),
    (dict(num_hidden_layers=3), "unfilled"),
    (dict(num_hidden_layers=1), "does not map"),
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "supported"),
])
def test_llama_refusals(tmp_path, tiny_hf_llama, changes, message):
  tiny_hf_llama().save_pretrained(tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(ValueError, match=message):
    hf_port.load_hf(tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(activation_function="gelu_new"), "GELU"),
    (dict(scale_embedding=False), "scale_embedding"),
    (dict(pad_token_id=0), "pad_token_id"),
    (dict(layernorm_embedding=True), "layernorm_embedding"),
])
def test_xglm_refusals(tmp_path, tiny_hf_xglm, changes, message):
  tiny_hf_xglm().save_pretrained(tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(ValueError, match=message):
    hf_port.load_hf(tmp_path)


def test_unknown_tensor_refused(tmp_path, tiny_hf_llama):
  from safetensors.numpy import load_file, save_file
  tiny_hf_llama().save_pretrained(tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = load_file(path)
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="does not map"):
    hf_port.load_hf(tmp_path)


def test_tied_head_that_differs_is_refused(tmp_path, tiny_hf_llama):
  from safetensors.numpy import load_file, save_file
  tiny_hf_llama(tie=True).save_pretrained(tmp_path)
  path = tmp_path / "model.safetensors"
  tensors = load_file(path)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="ties them"):
    hf_port.load_hf(tmp_path)


def test_bfloat16_checkpoint_loads(tmp_path, tiny_hf_llama):
  reference = tiny_hf_llama()
  reference.to(torch.bfloat16).save_pretrained(tmp_path)
  model, _ = hf_port.load_hf(tmp_path)
  expected = reference.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), expected)
  model16, _ = hf_port.load_hf(tmp_path, dtype="bfloat16")
  assert model16.embed.embedding[...].dtype == jnp.bfloat16 and model16.config.dtype == "bfloat16"
  np.testing.assert_array_equal(np.asarray(model16.embed.embedding[...], np.float32), expected)
