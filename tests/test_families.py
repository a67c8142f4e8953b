"""The families beyond Llama's (Gemma 2/3, Phi-3/Phi-4-mini, YaRN and LongRoPE, Qwen3-MoE, Mixtral) against
transformers.

Logits, gradients, cached greedy generation across the sliding window and the cache itself run for every
family of conftest.FAMILIES in test_model.py; here: left padding and packing on each new family, the config
spellings real hub files use, longrope's switch between its factors, the configs minicustom writes, and
every adapter method of the registry trained one step on each family. Tolerances as in test_model.py.
"""

import dataclasses
import json

import pytest
import torch
from conftest import make_checkpoint, make_hf_model
from test_model import _hf_generate, _ids

import minicustom as mc
from minicustom.generate import left_pad
from minicustom.methods import REGISTRY, adapter_configs, apply_method

NEW = ["gemma2", "gemma3", "phi3", "phi4mini", "qwen3-yarn", "qwen3moe", "mixtral"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> (folder, transformers model), written once per module."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family):
        if family not in made:
            made[family] = make_checkpoint(root / family, family)
        return made[family]
    return get


@pytest.mark.parametrize("family", NEW)
def test_left_padded_rows_generate_what_they_generate_alone(ckpt, family):
    """Rows of 9, 14 and 11 tokens, left-padded, 10 new tokens each (past the sliding window of 7): each row as
    alone, and the padded batch as transformers generates it. (Every row is past phi4mini's original context
    of 8: longrope picks its factors from the batch's largest position, so a shorter row would be rotated
    with other tables in a batch than alone, in transformers as here.)"""
    path, hf = ckpt(family)
    model = mc.load_model(path)
    rows = [_ids(1, n, seed=n)[0].tolist() for n in (9, 14, 11)]
    ids, mask = left_pad(rows, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=10, attention_mask=mask)
    for b, row in enumerate(rows):
        assert out[b, -10:].tolist() == model.generate(torch.tensor([row]), max_new_tokens=10)[0, -10:].tolist()
    assert torch.equal(out, _hf_generate(hf, ids, 10, attention_mask=mask))


@pytest.mark.parametrize("family", NEW)
def test_packed_documents_equal_each_document_alone(ckpt, family):
    path, hf = ckpt(family)
    model = mc.load_model(path)
    docs = [_ids(1, n, seed=10 + n) for n in (9, 12, 10)]  # each past phi4mini's original context (see above)
    seq_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        out = model(torch.cat(docs, dim=1), seq_ids=seq_ids)
        alone = torch.cat([hf(d).logits for d in docs], dim=1)
    torch.testing.assert_close(out, alone, atol=1e-4, rtol=0)


def test_longrope_uses_short_factors_within_the_original_context_and_long_ones_beyond(ckpt):
    """Phi-4-mini-like: original context 8. A 6-token forward takes the short factors, a 12-token one the long
    ones (each equal to transformers); generation from 5 tokens crosses position 8 and switches tables
    mid-way, in the cache as in transformers."""
    path, hf = ckpt("phi4mini")
    model = mc.load_model(path)
    short, long = _ids(1, 6, seed=7), _ids(1, 12, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(model(short), hf(short).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(long), hf(long).logits, atol=1e-4, rtol=0)
        model.rope.long_inv_freq = model.rope.inv_freq  # guard: the long factors matter at 12 tokens
        assert (model(long) - hf(long).logits).abs().max() > 1e-3
    model = mc.load_model(path)
    prompt = _ids(2, 5, seed=9)
    assert torch.equal(model.generate(prompt, max_new_tokens=12), _hf_generate(hf, prompt, 12))


def _hub_spelling(path, edits):
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(edits)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("family, edits", [
    # Phi-3.5-mini / Phi-4-mini as on the hub: rope_scaling of type "longrope", the original context and
    # partial_rotary_factor at the top level, no factor (implied: max / original). (Older files say "su",
    # which we read as longrope too; transformers 5.24 then fails on its own missing-key check.)
    ("phi4mini", {"rope_theta": 10000.0, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 8,
                  "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.2, 3.0],
                                   "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0]}}),
    # Gemma 3 as on the hub: rope_theta (global), rope_local_base_freq, a linear rope_scaling for the global
    # layers, sliding_window_pattern instead of layer_types (pattern 2 on 3 layers: sliding, global, sliding).
    ("gemma3", {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "layer_types": None, "sliding_window_pattern": 2}),
    # Qwen3 with YaRN in the older rope_scaling field.
    ("qwen3-yarn", {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 64}}),
])
def test_hub_config_spellings_give_transformers_logits(tmp_path, family, edits):
    import transformers

    path, _ = make_checkpoint(tmp_path, family)
    _hub_spelling(path, edits)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = _ids(2, 20, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(mc.load_model(path)(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", NEW)
def test_saved_model_loads_in_transformers_with_the_same_logits(ckpt, tmp_path, family):
    """mc.save_model writes the family's config.json (older schema) and keys: transformers reads them back."""
    import transformers

    path, _ = ckpt(family)
    model = mc.load_model(path)
    mc.save_model(model, tmp_path / "saved")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(hf).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    ids = _ids(2, 20, seed=12)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
        torch.testing.assert_close(mc.load_model(tmp_path / "saved")(ids), model(ids), atol=0, rtol=0)


def test_gemma2_soft_caps_bend_the_scores_and_logits(tmp_path):
    """Guard for the parity tests: with the caps of the fixture, removing either cap moves the logits."""
    path, _ = make_checkpoint(tmp_path, "gemma2")
    ids = _ids(1, 20)
    with torch.no_grad():
        capped = mc.load_model(path)(ids)
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            model = mc.load_model(path)
            setattr(model.config, field, None)
            for layer in model.model.layers:
                layer.self_attn.softcap = model.config.attn_logit_softcapping
            assert (model(ids) - capped).abs().max() > 1e-2, field


def test_fused_projection_shapes_that_the_config_does_not_give_name_the_tensor(tmp_path):
    path, _ = make_checkpoint(tmp_path, "phi3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = 1  # the weights hold (4 + 2 * 2) * 16 rows of q, k and v; the config asks for 6
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mc.CheckpointError, match=r"self_attn\.qkv_proj\.weight: checkpoint \(128, 64\), "
                                                 r"model \(96, 64\) \(in model.safetensors\); qkv_proj holds "
                                                 r"\[q; k; v\]: \(num_attention_heads \+ 2 \* num_key_value_heads\)"):
        mc.load_model(path)


# -- every adapter method of the registry on every new family ----------------------------------------------

def _method_kwargs(name):
    if name in ("prompt", "ptuning", "prefix"):
        return dict(num_virtual_tokens=3)
    if name == "llama-adapter":
        return dict(adapter_len=3, adapter_layers=2)
    return {}


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "full"])
@pytest.mark.parametrize("family", NEW)
def test_every_method_trains_one_step_with_the_base_frozen(ckpt, family, name):
    """One AdamW step on a next-token loss: the adapter's parameters move and get finite gradients, the
    frozen base stays bit-identical, and the adapter saves and loads onto a fresh base with the same logits."""
    path, _ = ckpt(family)
    base = dict(quantize="nf4") if name == "qlora" else {}
    model = mc.load_model(path, **base)
    torch.manual_seed(0)
    apply_method(model, name, **_method_kwargs(name))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k not in trained}
    assert trained, name
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.AdamW(trained.values(), lr=1e-2)
    model.train()
    ids = _ids(2, 12, seed=13)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in trained.values()), name
    opt.step()
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
    state = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(state[k], v), k
    model.eval()
    if name == "qlora-loftq" or not adapter_configs(model):
        return  # LoftQ's adapter fits its own 4-bit base (saved with the model)
    with torch.no_grad():
        expected = model(ids)
    mc.save_adapter(model, path.parent / f"{family}-{name}")
    fresh = mc.load_adapter(mc.load_model(path, **base), path.parent / f"{family}-{name}")
    tol = 1e-4 if name in ("pissa", "olora") else 1e-5  # PiSSA / OLoRA: saved as PEFT's rank-2r conversion
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), expected, atol=tol, rtol=tol)


def test_hf_model_for_each_new_family_has_our_parameter_names():
    for family in NEW:
        hf = make_hf_model(family)
        config = mc.ModelConfig.from_dict(hf.config.to_dict())
        if config.num_experts:  # transformers holds experts as 3-D parameters (fused layout)
            config = dataclasses.replace(config, fused_experts=True)
        ours = mc.Transformer(config)
        assert set(dict(ours.named_parameters())) == set(dict(hf.named_parameters())), family


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi4mini", "qwen3moe"])
def test_bf16_forward_is_as_close_to_fp32_as_transformers_bf16(tmp_path, family):
    """The half-precision paths of the new families (Gemma's (1 + w) norm multiplied in fp32 before the cast,
    the sqrt(C) embedding scale cast to bf16, the capped scores' fp32 softmax, partial rotary, the experts'
    index_add_) lose no more to bf16 than transformers does: the largest error of our bf16 logits against
    the fp32 ones is within 1.25x transformers' own bf16 error plus one bf16 step (2^-8) of the largest logit.
    The two bf16 runs round different operation orders, so they are not compared with each other (measured:
    0.15 to 0.60 apart, each 0.17 to 0.83 from fp32); a cast in the wrong place would be several times worse."""
    path, hf = make_checkpoint(tmp_path, family)
    ids = _ids(2, 20, seed=14)
    with torch.no_grad():
        ref = hf(ids).logits
        ours = mc.load_model(path, dtype=torch.bfloat16)(ids)
        theirs = hf.to(torch.bfloat16)(ids).logits
    assert ours.dtype == theirs.dtype == torch.bfloat16
    ours_err, their_err = (ours.float() - ref).abs().max(), (theirs.float() - ref).abs().max()
    assert ours_err <= 1.25 * their_err + 2.0 ** -8 * ref.abs().max(), (ours_err, their_err)
