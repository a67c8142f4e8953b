"""Prompt tuning and p-tuning against PEFT (the test-only oracle), and their invariants in minicustom.

PEFT prepends the virtual tokens' embeddings E to every row and returns logits (B, P + T, V);
minicustom runs E once and hands each layer's keys/values to the model as a joint prefix, so our
(B, T, V) is compared with PEFT's [:, P:]. Weights are made identical by construction: our encoders
are built in PEFT's order with PEFT's module names, so under the same seed both draw the same
numbers (asserted bit for bit; that is the init test), and "prompt_encoder.<name>.<key>" in PEFT is
"kv_prefix.prompt_encoder.<name>.<key>" here. E ~ N(0, 1) moves the logits by O(1), so a dropped
prefix, a wrong position shift or a prefix hidden by the mask shows far above round-off.

Tolerances (fp32; eps = 1.2e-7, one ulp of the largest logit |y| ~ 7 is 4.8e-7). The base model is
bitwise transformers' (tests/test_model.py), and both sides evaluate the same expressions; what
differs is the shape of the work: the virtual tokens' keys/values come from matmuls over P rows at
batch 1 instead of over B (P + T) rows, and the tokens attend over [prefix; tokens] with our explicit
mask. Other BLAS blockings reorder each length-C dot product (~1 ulp per entry), and a few ulps of
|y| per layer pass through RMSNorm without growing: the LoRA parity budget (tests/test_lora_peft.py),
atol 1e-5 with rtol 1e-6, ≈ 1.7e-5 at |y| = 7; measured ≤ 5.3e-6 over three families × three
methods, and ≤ 7.4e-6 through folders (vocabulary 400, logits up to ~9). Gradients of E and of the encoder reach |g| ~ 1000 (sums over B·T positions and, for the
encoder, over P virtual tokens), where one ulp is 6e-5, so they are compared divided by their
largest entry with atol 1e-5: the same relative bound (measured ≤ 3.3e-6). Folders copy tensors bit
for bit, so a round trip adds nothing to that budget. Within minicustom, anything computed the same
way is compared exactly (disabled adapters, the frozen base after a step, gradient checkpointing);
cached decoding and packed or padded rows change matmul shapes as above, so greedy tokens are
compared exactly and logits within 1e-5.
"""

import json

import pytest
import torch
from conftest import make_checkpoint, write_tokenizer
from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import minicustom as mc
from minicustom.methods import unload
from minicustom.methods.base import AdapterLayer
from minicustom.methods.prompt_tuning import (
    ENCODER_FILE,
    VirtualTokens,
    apply_p_tuning,
    apply_prompt_tuning,
    text_init_ids,
)

ATOL, RTOL = 1e-5, 1e-6  # logits
GATOL = 1e-5  # gradients, divided by their largest entry
P, H = 5, 24  # virtual tokens, encoder hidden size (not C, so a swapped dimension fails)
METHODS = ["prompt", "mlp", "lstm"]


def _ids(B=2, T=17, seed=1, vocab=131):
    """Token ids from 3 up: no pad (0), BOS or EOS."""
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _apply(model, method, seed=7, **kw):
    torch.manual_seed(seed)
    if method == "prompt":
        return apply_prompt_tuning(model, P, verbose=False, **kw)
    return apply_p_tuning(model, P, encoder=method, encoder_hidden_size=H, verbose=False, **kw)


def _peft(hf, method, seed=7, **kw):
    torch.manual_seed(seed)
    if method == "prompt":
        return get_peft_model(hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))
    return get_peft_model(hf, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=H,
                                                  encoder_reparameterization_type=method.upper()))


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable tensors under PEFT's in-memory names minus "prompt_encoder." (ours minus "kv_prefix.")."""
    return {n.removeprefix("kv_prefix.").removeprefix("prompt_encoder."): p
            for n, p in model.named_parameters() if p.requires_grad}


def _pair(tmp_path, family, method):
    path, hf = make_checkpoint(tmp_path / family, family)
    peft = _peft(hf, method)
    model = mc.load_model(path)
    _apply(model, method)
    return path, model, peft


def _assert_prompt_matters(model, ids, out):
    with torch.no_grad(), mc.disable_adapters(model):
        assert (out - model(ids)).abs().max() > 0.1


# -- 1. same weights, same logits and gradients ----------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama3", "smollm", "qwen3"])
def test_logits_and_gradients_match_peft(tmp_path, family, method):
    """Under one seed our E (prompt tuning, RANDOM init) or encoder (MLP, LSTM) is PEFT's bit for bit;
    then on a batch whose second row is left-padded, train mode, the logits of the real positions equal
    PEFT's [:, P:] and the gradient of every trainable tensor equals PEFT's. The probe is zero on pad
    positions, whose queries see the prefix and themselves here and the prefix only in PEFT."""
    _, model, peft = _pair(tmp_path, family, method)
    ours, theirs = _trainable(model), _trainable(peft)
    assert set(ours) == set(theirs) and len(ours) == {"prompt": 1, "mlp": 7, "lstm": 21}[method]
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)
    model.train()
    peft.train()

    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    probe = torch.randn(2, 17, 131, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    out = model(ids, attention_mask=mask)
    ref = peft(input_ids=ids, attention_mask=mask).logits
    assert ref.shape == (2, P + 17, 131)
    ref = ref[:, P:]
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=RTOL)
    _assert_prompt_matters(model, ids, out)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    for name in ours:
        scale = theirs[name].grad.abs().max()
        torch.testing.assert_close(ours[name].grad / scale, theirs[name].grad / scale, atol=GATOL, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("text", ["the", "The quick brown fox jumps over 13 lazy dogs in 2024"])
def test_init_from_text_and_sampled_vocab_match_peft(tmp_path, text):
    """TEXT: PEFT tokenizes init_text with AutoTokenizer on a saved tokenizer folder (BOS added, as
    `tokenizer(text)`) and repeats or cuts the ids to P; ours, with mc.load_tokenizer on the same folder,
    gives the same E bit for bit: the embedding rows of those ids. The first text is shorter than P = 5
    tokens with BOS (repeated), the second longer (cut). SAMPLE_VOCAB: under one seed, the same draw."""
    path, hf = make_checkpoint(tmp_path / "base", "smollm", vocab_size=400)
    write_tokenizer(path)
    tok = mc.load_tokenizer(path)
    ids = tok.encode(text)
    assert (len(ids) < P) == (text == "the") and ids[0] == tok.bos_token_id
    peft = _peft(hf, "prompt", prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=str(path))
    model = mc.load_model(path)
    _apply(model, "prompt", init="text", init_text=text, tokenizer=path)
    E = model.kv_prefix.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(E, peft.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)
    expected = (ids * P)[:P]
    assert text_init_ids(tok, text, P) == expected
    torch.testing.assert_close(E, model.model.embed_tokens.weight[expected], atol=0, rtol=0)
    assert model.adapter_configs["default"].tokenizer_name_or_path == str(path)

    sampled = _peft(make_checkpoint(tmp_path / "b2", "smollm", vocab_size=400)[1], "prompt",
                    prompt_tuning_init="SAMPLE_VOCAB")
    _apply(model, "prompt", init="sample_vocab", adapter_name="s")
    torch.testing.assert_close(model.kv_prefix.prompt_encoder["s"].embedding.weight,
                               sampled.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


# -- 2. invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_only_the_prompt_trains_and_the_base_is_frozen(tmp_path, method):
    """Only E / the encoder are trainable; an AdamW step (weight decay on) moves all of them and leaves
    every base tensor bit-identical; with adapters disabled the model is exactly the base, and unloading
    removes the seam module."""
    path, _ = make_checkpoint(tmp_path, "smollm")
    base = mc.load_model(path)
    model = _apply(mc.load_model(path), method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("kv_prefix.prompt_encoder.default.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    model(_ids()).logsumexp(-1).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n

    ids = _ids(seed=4)
    model.eval()
    with torch.no_grad():
        ref = base(ids)
        with mc.disable_adapters(model):
            torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
        assert (model(ids) - ref).abs().max() > 0.1
        unload(model, merge=False)
        assert model.kv_prefix is None and not getattr(model, "adapter_configs", {})
        torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "lstm"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, method):
    """Checkpointing recomputes the same operations in the same order (the virtual tokens' forward is
    checkpointed too, the prefix crossing into every checkpointed block), so the gradients of E and the
    encoder are the same bits, also on a packed batch."""
    path, _ = make_checkpoint(tmp_path, "qwen3")
    ids = _ids(2, 13)
    seq_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13])
    grads = []
    for ckpt in (False, True):
        model = _apply(mc.load_model(path), method).train()
        model.gradient_checkpointing = ckpt
        model(ids, seq_ids=seq_ids).square().mean().backward()
        grads.append({n: p.grad for n, p in _trainable(model).items()})
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=0, rtol=0, msg=name)


def test_packed_and_left_padded_rows_equal_each_document_alone(tmp_path):
    """Every packed document sees the virtual tokens, and starts at position P, as if run alone; a
    left-padded row with positions counted over its real tokens gives the row alone too."""
    path, _ = make_checkpoint(tmp_path, "llama3")
    model = _apply(mc.load_model(path), "mlp").eval()
    docs = [_ids(1, n, seed=10 + n) for n in (6, 11, 4)]
    seq_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), docs[1]], dim=1)
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = [model(d) for d in docs]
        torch.testing.assert_close(model(torch.cat(docs, dim=1), seq_ids=seq_ids), torch.cat(alone, dim=1),
                                   atol=ATOL, rtol=RTOL)
        out = model(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        torch.testing.assert_close(out[:, 5:], alone[1], atol=ATOL, rtol=RTOL)
    _assert_prompt_matters(model, docs[1], alone[1])


@pytest.mark.parametrize("method", ["prompt", "lstm"])
def test_cached_generation_equals_an_uncached_greedy_loop(tmp_path, method):
    """The prefix is written into the KV cache once, when the cache is made: greedy generation picks the
    tokens of re-running the whole sequence at every step, for a batch and for ragged prompts given as
    lists (left-padded by generate, each row as if alone)."""
    path, _ = make_checkpoint(tmp_path, "qwen3")
    model = _apply(mc.load_model(path), method).eval()

    def loop(seq, n):
        with torch.no_grad():
            for _ in range(n):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq

    seq = _ids(2, 6, seed=6)
    assert torch.equal(model.generate(seq, max_new_tokens=10), loop(seq, 10))
    rows = [_ids(1, 3, seed=8)[0].tolist(), _ids(1, 9, seed=9)[0].tolist()]
    out = model.generate(rows, max_new_tokens=8)
    for b, row in enumerate(rows):
        assert out[b, 9:].tolist() == loop(torch.tensor([row]), 8)[0, len(row):].tolist()
    with mc.disable_adapters(model):
        base = model.generate(seq, max_new_tokens=10)
    assert not torch.equal(base, model.generate(seq, max_new_tokens=10))


def test_named_adapters(tmp_path):
    """A prompt-tuning and a p-tuning adapter share the seam; set_adapter switches between them (each
    gives what it gives alone), two active at once is an error, and deleting one leaves the other."""
    path, _ = make_checkpoint(tmp_path, "llama3")
    ids = _ids()
    alone_a, alone_b = _apply(mc.load_model(path), "prompt", seed=1), _apply(mc.load_model(path), "mlp", seed=2)
    model = _apply(mc.load_model(path), "prompt", seed=1, adapter_name="a")
    _apply(model, "mlp", seed=2, adapter_name="b")
    with torch.no_grad():
        assert torch.equal(model(ids), alone_b(ids))
        mc.set_adapter(model, "a")
        assert torch.equal(model(ids), alone_a(ids))
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "kv_prefix.prompt_encoder.a.embedding.weight"}
        mc.set_adapter(model, ["a", "b"])
        with pytest.raises(ValueError, match="one adapter at a time"):
            model(ids)
        mc.delete_adapter(model, "a")
        mc.set_adapter(model, "b")
        assert torch.equal(model(ids), alone_b(ids))


# -- 3. files ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, method):
    """PEFT saves prompt_embeddings = E (the encoder's output for p-tuning) and no encoder; we load it as
    an embedding-only adapter and give the logits of PEFT's model (train mode: its encoder runs)."""
    path, hf = make_checkpoint(tmp_path / "base", "smollm")
    peft = _peft(hf, method)
    peft.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / ENCODER_FILE).exists()
    model = mc.load_adapter(mc.load_model(path), tmp_path / "adapter").eval()
    if method != "prompt":
        assert model.adapter_configs["default"].embedding_only
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(out, peft(input_ids=ids).logits[:, P:], atol=ATOL, rtol=RTOL)
    _assert_prompt_matters(model, ids, out)


@pytest.mark.parametrize("method", [*METHODS, "text", "text-tokenizer"])
def test_adapter_saved_by_minicustom_loads_in_peft_and_back(tmp_path, method):
    """Our folder: adapter_config.json with PEFT's fields for the method, prompt_embeddings (P, C) = E.
    PeftModel.from_pretrained gives our logits; loading it back gives them exactly, and for p-tuning
    the encoder comes back bit for bit from prompt_encoder.safetensors, trainable with is_trainable.
    TEXT init from a tokenizer folder records it; from a Tokenizer object there is no path to record and
    PEFT refuses TEXT without one, so the folder says RANDOM and keeps the text."""
    path, hf = make_checkpoint(tmp_path / "base", "smollm", vocab_size=400)
    model = mc.load_model(path)
    if method.startswith("text"):
        write_tokenizer(path)
        tokenizer = path if method == "text" else mc.load_tokenizer(path)
        _apply(model, "prompt", init="text", init_text="Paris and Lima", tokenizer=tokenizer)
    else:
        _apply(model, method)
    with torch.no_grad():  # as after training: E no longer the init's
        for p in model.kv_prefix.parameters():
            p.add_(0.1 * torch.randn_like(p))
    mc.save_adapter(model, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    fields = {"num_virtual_tokens": P, "token_dim": 72, "num_transformer_submodules": 1, "num_attention_heads": 9,
              "num_layers": 2, "task_type": "CAUSAL_LM", "peft_type": "P_TUNING" if method in ("mlp", "lstm")
              else "PROMPT_TUNING"}
    fields.update({"text": {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Paris and Lima",
                            "tokenizer_name_or_path": str(path)},
                   "text-tokenizer": {"prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": "Paris and Lima",
                                      "tokenizer_name_or_path": None},
                   "prompt": {"prompt_tuning_init": "RANDOM"}}.get(method, {
                       "encoder_reparameterization_type": method.upper(), "encoder_hidden_size": H,
                       "encoder_num_layers": 2, "encoder_dropout": 0.0}))
    assert {k: written.get(k) for k in fields} == fields
    assert (tmp_path / "adapter" / ENCODER_FILE).exists() == (method in ("mlp", "lstm"))

    peft = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    back = mc.load_adapter(mc.load_model(path), tmp_path / "adapter", is_trainable=True).eval()
    model.eval()
    ids = _ids(vocab=400)
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(peft(input_ids=ids).logits[:, P:], out, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(back(ids), out, atol=0, rtol=0)
    _assert_prompt_matters(model, ids, out)
    ours, theirs = _trainable(back), _trainable(model)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=0, rtol=0, msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A minicustom p-tuning (MLP) folder on a llama3 checkpoint."""
    root = tmp_path_factory.mktemp("saved")
    path, _ = make_checkpoint(root / "base", "llama3")
    mc.save_adapter(_apply(mc.load_model(path), "mlp"), root / "adapter")
    return path, root / "adapter"


def _edit(src, dst, config=None, tensors=None, drop_encoder=False):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    save_file(tensors or load_file(src / "adapter_model.safetensors"), dst / "adapter_model.safetensors")
    if not drop_encoder:
        (dst / ENCODER_FILE).write_bytes((src / ENCODER_FILE).read_bytes())
    return dst


BAD = {
    "wrong shape": (dict(tensors={"prompt_embeddings": torch.zeros(P, 32)}), r"shape \(5, 32\), expected \(5, 64\)"),
    "wrong count": (dict(tensors={"prompt_embeddings": torch.zeros(P + 1, 64)}), r"expected \(5, 64\)"),
    "unknown key": (dict(tensors={"prompt_embeddings": torch.zeros(P, 64), "x": torch.zeros(1)}), r"found \['prompt_"),
    "missing key": (dict(tensors={"embedding.weight": torch.zeros(P, 64)}), "expected one tensor, prompt_embeddings"),
    "submodules": (dict(config={"num_transformer_submodules": 2}), "num_transformer_submodules=2"),
    "token_dim": (dict(config={"token_dim": 128}), "token_dim=128"),
    "task_type": (dict(config={"task_type": "SEQ_2_SEQ_LM"}), "task_type='SEQ_2_SEQ_LM'"),
    "modules_to_save": (dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save"),
    "encoder type": (dict(config={"encoder_reparameterization_type": "GRU"}), "encoder_reparameterization_type"),
    "encoder size": (dict(config={"encoder_hidden_size": 16}), "prompt_encoder.safetensors: expected tensors"),
    "stale encoder": (dict(tensors={"prompt_embeddings": torch.zeros(P, 64)}), "does not reproduce prompt_embeddings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folders_are_refused_before_the_model_changes(tmp_path, saved, case):
    path, good = saved
    kw, message = BAD[case]
    model = mc.load_model(path)
    with pytest.raises(mc.AdapterError, match=message):
        mc.load_adapter(model, _edit(good, tmp_path / "bad", **kw))
    assert model.kv_prefix is None and not getattr(model, "adapter_configs", {})
    if case == "stale encoder":  # without the encoder file, the exported E alone loads
        mc.load_adapter(model, _edit(good, tmp_path / "ok", **kw, drop_encoder=True))


class _Other(AdapterLayer):
    active, merged = [], {}


def test_usage_errors(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama3")
    model = mc.load_model(path)
    with pytest.raises(ValueError, match="needs init_text and a tokenizer"):
        apply_prompt_tuning(model, init="text", init_text="hi", verbose=False)
    with pytest.raises(ValueError, match="init 'words' is not supported"):
        apply_prompt_tuning(model, init="words", verbose=False)
    with pytest.raises(ValueError, match="exactly 2 hidden layers"):
        apply_p_tuning(model, encoder_num_layers=3, verbose=False)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive"):
        apply_p_tuning(model, num_virtual_tokens=0, verbose=False)
    assert model.kv_prefix is None
    model.kv_prefix = _Other()
    with pytest.raises(ValueError, match="kv_prefix already holds _Other"):
        apply_prompt_tuning(model, verbose=False)
    assert not getattr(model, "adapter_configs", {})
    model.kv_prefix = None
    _apply(model, "prompt")
    assert isinstance(model.kv_prefix, VirtualTokens)
    with pytest.raises(ValueError, match="already exists"):
        _apply(model, "mlp")
