"""Shared fixtures: tiny random Hugging Face checkpoints of every supported family, written to tmp_path.

Weights are redrawn with a large spread (std 0.2, norms around 1) instead of HF's std 0.02, so that
logits are O(1) and a wrong sign, a swapped half or a missing bias shows far above fp32 round-off.
"""

import json
import os
import sys
from pathlib import Path

# The repository's kernels/ folder (installed as minicustom.kernels) would shadow the PyPI package `kernels`,
# which transformers (>= 5.25) and bitsandbytes import, wherever the repository root is on sys.path: `python
# -m pytest` puts the working directory there. Take it off before any test module is collected.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

# Triton reads TRITON_INTERPRET when @triton.jit decorates a function, its own helpers included, which it
# does when triton is first imported (peft and bitsandbytes import it): set it before any test module is
# collected, so the kernels run on the interpreter (CPU). A GPU run can set TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

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
    # Qwen3 with YaRN: the band ramp lies inside the 12 bands of head_dim 24, attention scaling 1.139.
    "qwen3-yarn": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=10000.0))),
    # Gemma 2: GeGLU, (1 + w) norms, sandwich norms, scaled embeddings, [sliding, global] layers, caps low
    # enough that tanh bends the scores and logits of these weights (eager attention: SDPA cannot cap).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=7, attn_logit_softcapping=3.0,
        final_logit_softcapping=4.0, attn_implementation="eager")),
    # Gemma 3: q/k norms, three layers (sliding, global, sliding), each kind with its own RoPE (linear on global).
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, query_pre_attn_scalar=20, sliding_window=7, num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e6),
                         "sliding_attention": dict(rope_type="default", rope_theta=1e4)})),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False)),
    # Phi-4-mini style: 3/4 of each head rotates, longrope past an original context of 8 (every test sequence
    # but the short-factor test's is longer, so cached decoding and a full forward use the same tables).
    "phi4mini": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=True, head_dim=16, original_max_position_embeddings=8, rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
            short_factor=[1.0, 1.1, 1.3, 1.7, 2.2, 3.0], long_factor=[1.0, 1.5, 2.5, 4.0, 7.0, 12.0]))),
    # Qwen3-MoE: 4 experts, top-2 renormalized, q/k norms; layer 1 dense (mlp_only_layers).
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        tie_word_embeddings=False, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
        norm_topk_prob=True, mlp_only_layers=[1])),
    # Mixtral: 4 experts (w1, w3, w2 under block_sparse_moe), top-2, a sliding window.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, sliding_window=7)),
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


@torch.no_grad()
def greedy_uncached(model, ids, n: int):
    """n greedy tokens by full forwards, no KV cache: the reference for cached generation."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def token_ids(B=2, T=17, seed=1):
    """Token ids from 3 up to the tiny models' 131: no pad (0), BOS or EOS, whose embedding rows HF treats
    specially."""
    return torch.randint(3, 131, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def disabled_is_the_base(model, base, ids):
    """With adapters disabled `model` gives `base`'s logits exactly, and enabled again its own; returns those."""
    import minicustom as mc

    adapted = model(ids)
    with mc.disable_adapters(model):
        assert torch.equal(model(ids), base(ids))
    assert torch.equal(model(ids), adapted)
    return adapted


def close_to_largest(out, ref, atol: float, what: str = ""):
    """out equals ref within atol of ref's largest entry (the comparison for logits and gradients of
    different magnitudes)."""
    scale = ref.abs().max()
    torch.testing.assert_close(out / scale, ref / scale, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def matches_peft(model, peft, ids, atol: float, prefix: str = "base_model.model."):
    """model and its PEFT twin (the same weights, both in train mode): the logits, and every trainable
    parameter's gradient of a fixed random probe of them, within atol of the reference's largest entry.
    Returns our logits."""
    probe = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(2))
    out, ref = model(ids), peft(input_ids=ids).logits
    close_to_largest(out, ref, atol, "logits")
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix(prefix): p for n, p in peft.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs)
    for name in ours:
        close_to_largest(ours[name].grad, theirs[name].grad, atol, name)
    return out


def adamw_step_changes(model, ids) -> list[str]:
    """One AdamW step (weight decay on) on a loss of the logits of `ids`. Asserts every frozen parameter is
    bit-identical after it; returns the names of the trained parameters it moved."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    return [n for n, before in trained.items() if not torch.equal(params[n], before)]


def make_checkpoint(path, family: str, seed: int = 0, **overrides):
    """Save a tiny random HF model of `family` as safetensors under path; returns (path, hf_model)."""
    model = make_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return path, model


def fused_copy(path, hf, to=None):
    """A copy of a MoE checkpoint with its experts as transformers >= 5 holds them in memory (3-D gate_up_proj
    and down_proj, Mixtral's block under `mlp`): hf.state_dict() itself, so every name is transformers'."""
    import shutil

    from safetensors.torch import save_file

    to = to or path.parent / (path.name + "-fused")
    shutil.copytree(path, to)
    (to / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(to / "model.safetensors"),
              metadata={"format": "pt"})
    return to


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def checkpoint(tmp_path, family):
    return make_checkpoint(tmp_path / family, family)


@pytest.fixture
def ckpt(tmp_path):
    """A tiny random SmolLM-style checkpoint (tied, 3:1 GQA, 72 features) in tmp_path / "base": the PEFT-method
    tests' base."""
    return make_checkpoint(tmp_path / "base", "smollm")[0]


SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# Llama-3-like template: writes bos_token itself, so encoding must not add a second BOS.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MIXED = (
    "The quick brown fox jumps over 13 lazy dogs in 2024, costing $1,234.56!\n\n"
    "def f(x):\n    return x ** 2  # squares\n\t\tTabs and   runs of   spaces.\n"
    "Ünïcödé: café, naïve, Zürich; 日本語のテキスト; 中文字符; 한국어; العربية; emoji 🤖🚀👩‍💻.\n"
    "<s>special tokens inline</s> and <|im_start|>user\nhi<|im_end|>\n"
    "Contractions: don't, I'm, we've, they're — and « quotes » „too“.\n"
) * 12


def write_tokenizer(path):
    """A byte-level BPE tokenizer trained on MIXED, with a BOS-adding post-processor (like Llama 3's)
    and a template that writes BOS itself; written to path as tokenizer.json + tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([MIXED[:2000]] * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True}, "pad_token": "</s>",
        "unk_token": "<unk>", "chat_template": TEMPLATE, "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return path


CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Hanoi", "Porto", "Seoul", "Perth", "Accra", "Riga", "Lagos", "Kyoto"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SmolLM-style checkpoint with the test tokenizer, and train/eval JSONL files of mixed formats."""
    root = tmp_path_factory.mktemp("train")
    path, _ = make_checkpoint(root / "model", "smollm", vocab_size=400)
    write_tokenizer(path)
    rows = []
    for i, city in enumerate(CITIES * 2):
        if i % 3 == 0:
            rows.append({"prompt": f"Where is {city}?", "completion": f" In {city}."})
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": f"Name a city like {city}."},
                                      {"role": "assistant", "content": city}]})
        else:
            rows.append({"instruction": "Name the city.", "input": f"I live in {city}.", "output": city})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return root, path


@pytest.fixture(scope="module")
def tok(setup):
    """The tokenizer of the `setup` checkpoint."""
    from minicustom import load_tokenizer

    return load_tokenizer(setup[1])


@pytest.fixture(scope="module")
def model(setup):
    """The `setup` checkpoint, loaded once per test module (tests must not train it)."""
    from minicustom import load_model

    return load_model(setup[1])


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """(tokenizer, model, folder): the `setup` model's kind with a context of 1024, for prompts longer than 256 tokens
    of the test tokenizer (APE's proposal prompt, a judge's rubric)."""
    from minicustom import load_model, load_tokenizer

    path, _ = make_checkpoint(tmp_path_factory.mktemp("long") / "model", "smollm", vocab_size=400,
                              max_position_embeddings=1024)
    write_tokenizer(path)
    return load_tokenizer(path), load_model(path), path
