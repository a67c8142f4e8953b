"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family, written to tmp_path.

Weights are redrawn with a large spread (std 0.2, norms around 1) instead of HF's std 0.02, so that
logits are O(1) and a wrong sign, a swapped half or a missing bias shows far above fp32 round-off.
"""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Awkward sizes on purpose: vocab and intermediate are not powers of two.
_BASE = dict(vocab_size=131, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = {
    # Llama 3.1 style: untied, GQA, llama3 frequency scaling that touches every band at this head size.
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    # Llama with every bias switched on (attention_bias covers o_proj too; mlp_bias).
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    # SmolLM2 style: tied embeddings, 3:1 GQA like SmolLM2-135M (9 heads, 3 kv heads), theta 1e5.
    "smollm": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=100000.0, hidden_size=72, num_attention_heads=9,
        num_key_value_heads=3)),
    # Mistral v0.1 style with a sliding window small enough to matter within the test sequences.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=7, head_dim=16)),
    # Qwen2: q/k/v bias, tied embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    # Qwen3: per-head q/k RMSNorm, head_dim (24) unrelated to hidden / heads (16).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24)),
}


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize(model, seed)
    return model


def make_checkpoint(path, family: str, seed: int = 0, **overrides):
    """Save a tiny random HF model of `family` as safetensors under path; returns (path, hf_model)."""
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def checkpoint(tmp_path, family):
    return make_checkpoint(tmp_path / family, family)
