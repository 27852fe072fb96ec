"""GGUF port: a tiny GGUF written here with gguf.GGUFWriter (llama.cpp's Q/K permutation, F32 and quantized
types) equals its safetensors twin and the transformers reference; metadata refusals; row permutation."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as QType

from dualform.convert import gguf as gguf_port
from dualform.convert import hf as hf_port

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
  """Verbatim logic of ``LlamaModel.permute`` in llama.cpp's convert_hf_to_gguf.py."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
  if hf_name in HF_TO_GGUF:
    return HF_TO_GGUF[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{LAYER_HF_TO_GGUF[rest]}"


def write_tiny_gguf(path, reference, *, matrix_type=QType.F32, embed_type=QType.F32, tokenizer_source=None,
                    extra_metadata=None):
  """Writes ``reference`` (a transformers Llama) as llama.cpp would; returns {hf name: stored float32 weights
  in HF layout} (what dequantization must give back, after un-permuting)."""
  config = reference.config
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
  writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
  writer.add_vocab_size(config.vocab_size)
  writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1 if matrix_type == QType.Q4_1 else gguf.LlamaFileType.ALL_F32))
  if tokenizer_source is not None:
    source = gguf.GGUFReader(str(tokenizer_source))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_token_types(source.fields["tokenizer.ggml.token_type"].contents())
    writer.add_token_merges(source.fields["tokenizer.ggml.merges"].contents())
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
  for key, value in (extra_metadata or {}).items():
    writer.add_string(key, value)
  stored = {}
  for hf_name, tensor in reference.state_dict().items():
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
      continue
    weights = tensor.detach().float().numpy()
    if hf_name.endswith("q_proj.weight"):
      weights = llama_cpp_permute(weights, config.num_attention_heads, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight"):
      weights = llama_cpp_permute(weights, config.num_attention_heads, config.num_key_value_heads)
    qtype = QType.F32 if weights.ndim == 1 else (embed_type if "embed" in hf_name else matrix_type)
    data = weights if qtype == QType.F32 else gguf.quants.quantize(weights, qtype)
    writer.add_tensor(gguf_name(hf_name), data, raw_dtype=qtype)
    dequantized = weights if qtype == QType.F32 else gguf.quants.dequantize(data, qtype)
    if hf_name.endswith("q_proj.weight"):
      dequantized = gguf_port.unpermute_rows(dequantized, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight"):
      dequantized = gguf_port.unpermute_rows(dequantized, config.num_key_value_heads)
    stored[hf_name] = np.ascontiguousarray(dequantized, np.float32)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return stored


def write_twin(directory, reference, stored):
  """The safetensors twin: the same (dequantized) weights under HF names, with the reference's config.json."""
  from safetensors.numpy import save_file
  directory.mkdir()
  reference.config.save_pretrained(directory)
  save_file(stored, directory / "model.safetensors", metadata={"format": "pt"})


def flat_params(model):
  return {"/".join(map(str, path)): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model,
                                                                                                     nnx.Param))}


def test_permutation_round_trip():
  rng = np.random.default_rng(0)
  weights = rng.standard_normal((12 * 8, 5)).astype(np.float32)
  for heads in (1, 3, 12):
    permuted = llama_cpp_permute(weights, heads, None)
    np.testing.assert_array_equal(gguf_port.permute_rows(weights, heads), permuted)
    np.testing.assert_array_equal(gguf_port.unpermute_rows(permuted, heads), weights)
    assert not np.array_equal(permuted, weights)
  with pytest.raises(ValueError, match="un-permute"):
    gguf_port.unpermute_rows(weights[:10], 3)


@pytest.mark.needs_ref
@pytest.mark.parametrize("tie", [True, False])
def test_f32_gguf_matches_transformers(tmp_path, tiny_hf_llama, tie):
  torch = pytest.importorskip("torch")
  reference = tiny_hf_llama(tie=tie, vocab_size=64)
  write_tiny_gguf(tmp_path / "tiny.gguf", reference)
  model, info = gguf_port.load_gguf(tmp_path / "tiny.gguf")
  assert model.config.tie_embeddings == tie and (model.config.num_heads, model.config.num_kv_heads) == (4, 2)
  assert info["tensor_types"] == {"F32": 2 * 9 + 2 + (0 if tie else 1)}
  tokens = np.array([[3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32, 38, 4, 6, 2, 6, 43, 38, 3]], np.int32)
  with torch.no_grad():
    expected = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(model(jnp.asarray(tokens)))
  assert np.max(np.abs(logits - expected)) / np.max(np.abs(expected)) <= 1e-4


@pytest.mark.needs_ref
@pytest.mark.parametrize("matrix_type, embed_type", [(QType.Q4_1, QType.Q8_0), (QType.Q4_0, QType.F16),
                                                     (QType.Q8_0, QType.BF16)])
def test_quantized_gguf_equals_safetensors_twin(tmp_path, tiny_hf_llama, matrix_type, embed_type):
  reference = tiny_hf_llama(tie=False, vocab_size=64)
  stored = write_tiny_gguf(tmp_path / "tiny.gguf", reference, matrix_type=matrix_type, embed_type=embed_type)
  write_twin(tmp_path / "twin", reference, stored)
  model, info = gguf_port.load_gguf(tmp_path / "tiny.gguf")
  twin, _ = hf_port.load_hf(tmp_path / "twin")
  assert info["tensor_types"] == {"F32": 5, matrix_type.name: 2 * 7 + 1, embed_type.name: 1}
  ours, theirs = flat_params(model), flat_params(twin)
  assert ours.keys() == theirs.keys()
  for path in ours:
    np.testing.assert_array_equal(ours[path], theirs[path], err_msg=path)
  tokens = jnp.arange(20, dtype=jnp.int32)[None] * 3 % 64
  with jax.default_matmul_precision("highest"):
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(twin(tokens)))


@pytest.mark.needs_ref
def test_raw_rows_with_rotate_half_would_be_wrong(tmp_path, tiny_hf_llama):
  """Skipping the un-permute changes the logits (the pitfall the port guards against)."""
  reference = tiny_hf_llama(vocab_size=64)
  write_tiny_gguf(tmp_path / "tiny.gguf", reference)
  model, _ = gguf_port.load_gguf(tmp_path / "tiny.gguf")
  tokens = jnp.arange(16, dtype=jnp.int32)[None]
  good = np.asarray(model(tokens))
  for block in model.layers:
    block.attn.q_proj.kernel[...] = gguf_port.permute_rows(np.asarray(block.attn.q_proj.kernel[...]).T, 4).T
    block.attn.k_proj.kernel[...] = gguf_port.permute_rows(np.asarray(block.attn.k_proj.kernel[...]).T, 2).T
  bad = np.asarray(model(tokens))
  np.testing.assert_allclose(bad[0, 0], good[0, 0], rtol=1e-5, atol=1e-6)  # position 0: no rotation
  assert np.max(np.abs(bad[0, 1:] - good[0, 1:])) > 1e-3


@pytest.mark.needs_ref
def test_load_pretrained_gguf_with_tokenizer(tmp_path, tiny_hf_llama, smollm2_gguf):
  from dualform.loading import load_pretrained
  reference = tiny_hf_llama(vocab_size=49152)
  write_tiny_gguf(tmp_path / "tiny.gguf", reference, matrix_type=QType.Q4_1, embed_type=QType.Q8_0,
                  tokenizer_source=smollm2_gguf)
  pretrained = load_pretrained(tmp_path / "tiny.gguf")
  assert pretrained.info["format"] == "gguf" and len(pretrained.info["sha256"]) == 64
  assert pretrained.info["quantization"] == dict(file_type=3, file_type_name="MOSTLY_Q4_1",
                                                 tensor_types={"F32": 5, "Q4_1": 14, "Q8_0": 1})
  assert pretrained.tokenizer.bos_id is None and pretrained.tokenizer.separator_id == 198
  assert pretrained.tokenizer.encode(" Positive") == [20085]


@pytest.mark.needs_ref
@pytest.mark.parametrize("key", ["llama.rope.scaling.type", "llama.expert_count"])
def test_unhandled_metadata_refused(tmp_path, tiny_hf_llama, key):
  write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(vocab_size=64), extra_metadata={key: "linear"})
  with pytest.raises(ValueError, match="does not handle"):
    gguf_port.load_gguf(tmp_path / "tiny.gguf")


@pytest.mark.needs_ref
def test_missing_tensor_refused(tmp_path, tiny_hf_llama):
  reference = tiny_hf_llama(vocab_size=64)
  reference.model.layers = reference.model.layers[:1]  # one layer of tensors under a two-layer header
  write_tiny_gguf(tmp_path / "tiny.gguf", reference)
  with pytest.raises(ValueError, match="unfilled"):
    gguf_port.load_gguf(tmp_path / "tiny.gguf")


def test_non_llama_architecture_refused(tmp_path):
  writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match="only 'llama'"):
    gguf_port.read_gguf_config(tmp_path / "gpt2.gguf")
