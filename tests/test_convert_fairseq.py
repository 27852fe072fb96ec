"""fairseq dense .pt port: a tiny checkpoint written here (state dict per PROTOCOL.md §12.3 + cfg) equals the
XGLM reference built from the same weights; safe unpickling; cfg / size-table cross-checks."""

from __future__ import annotations

import argparse
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualform.convert import fairseq as fairseq_port
from dualform.convert.keymaps import matching_named_config
from dualform.models import get_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.needs_ref


def fairseq_checkpoint(reference, **cfg_overrides):
  """A fairseq ``model.pt`` dict holding the weights of an HF XGLM ``reference``."""
  state = {"decoder.version": torch.tensor([3.0]), "decoder.embed_positions._float_tensor": torch.tensor([1.0])}
  for name, tensor in reference.state_dict().items():
    if name == "lm_head.weight":
      continue
    state["decoder." + name.removeprefix("model.")] = tensor.detach().clone()
  state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"].clone()
  config = reference.config
  model_cfg = dict(_name="transformer_lm_gpt", decoder_layers=config.num_layers, decoder_embed_dim=config.d_model,
                   decoder_ffn_embed_dim=config.ffn_dim, decoder_attention_heads=config.attention_heads,
                   decoder_input_dim=config.d_model, decoder_output_dim=config.d_model, activation_fn="gelu",
                   decoder_normalize_before=True, share_decoder_input_output_embed=True, no_scale_embedding=False,
                   decoder_learned_pos=False, layernorm_embedding=False, no_token_positional_embeddings=False,
                   max_target_positions=config.max_position_embeddings, dropout=0.1, attention_dropout=0.1,
                   activation_dropout=0.0, decoder_layerdrop=0.0)
  model_cfg.update(cfg_overrides)
  return {"model": state, "cfg": {"model": model_cfg, "task": {"_name": "language_modeling"}},
          "optimizer_history": [], "extra_state": {}}


def relative_error(actual, expected):
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_fairseq_checkpoint_matches_xglm_reference(tmp_path, tiny_hf_xglm):
  reference = tiny_hf_xglm()
  torch.save(fairseq_checkpoint(reference), tmp_path / "model.pt")
  model, info = fairseq_port.load_fairseq(tmp_path / "model.pt")
  assert info["format"] == "fairseq_pt" and model.config.num_heads == 4 and model.config.first_position == 2
  tokens = np.array([[0, 5, 17, 3, 42, 8, 91, 60, 2, 33, 77, 11, 2]], np.int32)
  with torch.no_grad():
    expected = reference(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(model(jnp.asarray(tokens)))
  assert relative_error(logits, expected) <= 1e-4


def test_load_pretrained_fairseq_with_shared_dictionary(tmp_path, tiny_hf_xglm, fairseq_tokenizer):
  from dualform.loading import load_pretrained
  reference = tiny_hf_xglm(vocab_size=51200)
  torch.save(fairseq_checkpoint(reference), tmp_path / "model.pt")
  pretrained = load_pretrained(tmp_path)  # a directory holding model.pt
  assert pretrained.info["format"] == "fairseq_pt"
  assert pretrained.info["dictionary_md5"] == fairseq_port.STANDARD_DICT_MD5
  assert len(pretrained.info["sha256"]) == 64
  tokenizer = pretrained.tokenizer
  assert (tokenizer.bos_id, tokenizer.separator_id, tokenizer.vocab_size) == (0, 2, 51200)
  ids = [tokenizer.bos_id] + tokenizer.encode("The film was great") + [tokenizer.separator_id]
  with torch.no_grad():
    expected = reference(torch.tensor([ids], dtype=torch.long)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(pretrained.model(jnp.asarray([ids], dtype=jnp.int32)))
  assert relative_error(logits, expected) <= 1e-4


def test_pickled_objects_refused_unless_trusted(tmp_path, tiny_hf_xglm, caplog):
  checkpoint = fairseq_checkpoint(tiny_hf_xglm())
  checkpoint["args"] = argparse.Namespace(arch="transformer_lm_gpt")
  torch.save(checkpoint, tmp_path / "model.pt")
  with pytest.raises(ValueError, match="trust_pickle=True"):
    fairseq_port.load_fairseq(tmp_path / "model.pt")
  with caplog.at_level(logging.WARNING, logger="dualform.convert.fairseq"):
    model, info = fairseq_port.load_fairseq(tmp_path / "model.pt", trust_pickle=True)
  assert info["trust_pickle"] and "weights_only=False" in caplog.text
  assert model.config.num_layers == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(decoder_layers=3), "decoder_layers"),
    (dict(decoder_embed_dim=32), "decoder_embed_dim"),
    (dict(activation_fn="relu"), "activation_fn"),
    (dict(decoder_normalize_before=False), "decoder_normalize_before"),
    (dict(layernorm_embedding=True), "layernorm_embedding"),
    (dict(no_scale_embedding=True), "no_scale_embedding"),
    (dict(decoder_learned_pos=True), "decoder_learned_pos"),
])
def test_cfg_mismatch_refused(tmp_path, tiny_hf_xglm, overrides, message):
  torch.save(fairseq_checkpoint(tiny_hf_xglm(), **overrides), tmp_path / "model.pt")
  with pytest.raises(ValueError, match=message):
    fairseq_port.load_fairseq(tmp_path / "model.pt")


def test_untied_output_projection_refused(tmp_path, tiny_hf_xglm):
  checkpoint = fairseq_checkpoint(tiny_hf_xglm())
  checkpoint["model"]["decoder.output_projection.weight"] += 1.0
  torch.save(checkpoint, tmp_path / "model.pt")
  with pytest.raises(ValueError, match="ties them"):
    fairseq_port.load_fairseq(tmp_path / "model.pt")


def test_unknown_key_refused(tmp_path, tiny_hf_xglm):
  checkpoint = fairseq_checkpoint(tiny_hf_xglm())
  checkpoint["model"]["decoder.layernorm_embedding.weight"] = torch.ones(64)
  torch.save(checkpoint, tmp_path / "model.pt")
  with pytest.raises(ValueError, match="does not map"):
    fairseq_port.load_fairseq(tmp_path / "model.pt")


def test_head_count_cross_checked_against_size_table():
  """Head count is invisible in shapes: a 125m-shaped config with 16 heads is refused, 12 accepted."""
  config = get_config("fairseq-dense-125m")
  assert matching_named_config(config.replace(name="x")) == "fairseq-dense-125m"
  with pytest.raises(ValueError, match="heads"):
    matching_named_config(config.replace(num_heads=16, num_kv_heads=16, head_dim=48))


def test_head_count_taken_from_size_table_when_cfg_lacks_it():
  state = {"decoder.embed_tokens.weight": np.zeros((51200, 768), np.float32),
           "decoder.layers.0.fc1.weight": np.zeros((3072, 768), np.float32)}
  state.update({f"decoder.layers.{i}.fc2.bias": None for i in range(12)})
  config = fairseq_port.fairseq_config(state, {"decoder_layers": 12})
  assert config.name == "fairseq-dense-125m" and config.num_heads == 12
  state.update({f"decoder.layers.{i}.fc2.bias": None for i in range(13)})
  with pytest.raises(ValueError, match="cannot be inferred"):
    fairseq_port.fairseq_config(state, {})


def test_names_resolve_under_the_cache(tmp_path, monkeypatch, tiny_hf_xglm, fairseq_tokenizer):
  from dualform.loading import load_pretrained
  (tmp_path / "en_dense_lm_125m").mkdir()
  torch.save(fairseq_checkpoint(tiny_hf_xglm(vocab_size=51200)), tmp_path / "en_dense_lm_125m" / "model.pt")
  monkeypatch.setenv("DUALFORM_CACHE", str(tmp_path))
  for name in ("en_dense_lm_125m", "fairseq-dense-125m", "en_dense_lm_125m/model.pt"):
    assert load_pretrained(name).info["source"] == str(tmp_path / "en_dense_lm_125m" / "model.pt")
  with pytest.raises(ValueError, match="unknown model 'no-such-model'.*random:<config>"):
    load_pretrained("no-such-model")


def test_random_weights_with_the_fairseq_tokenizer(fairseq_tokenizer):
  from dualform.loading import load_model, load_pretrained
  model, tokenizer = load_model("random:tiny-fairseq", seed=3)
  assert model.config.name == "tiny-fairseq" and tokenizer.vocab_size == 51200 == model.config.vocab_size
  again = load_pretrained("random:tiny-fairseq", seed=3)
  np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), np.asarray(again.model.embed.embedding[...]))
  assert again.info == dict(source="random:tiny-fairseq", sha256=None, format="random", quantization=None,
                            dtype="float32", config="tiny-fairseq", seed=3)
  with pytest.raises(ValueError, match="unknown model config"):
    load_pretrained("random:no-such-config")
  with pytest.raises(ValueError, match="dtype"):
    load_pretrained("random:tiny-fairseq", dtype="int8")
