"""Trainable tokens: invariants, the formula, PEFT parity (logits, gradients, merging, folders both ways), errors,
and new tokens (tokenizer, resized vocabulary, the `train sft --new-tokens` flow read by transformers and PEFT).

The trained rows D are set to N(0, 0.5²) after attaching (in name order, so two models with the same names get
the same values), against embedding rows of std 0.2: the tokens' inputs (and, tied, their logits) change by O(1)
(checked), so a row written to the wrong index, or a tied lm_head that does not follow, shows far above round-off.

Exactness and tolerances (fp32, eps = 1.2e-7):
- Identity at init, disabled adapters, merge and unmerge: the method only copies rows (D = E0[I] at init,
  index_copy in the forward, E0[I] <- D when merging, E0[I] <- the saved copy when unmerging): no arithmetic,
  so all of these are exact (torch.equal), merged forward against unmerged included.
- PEFT parity: both sides run the same index_copy and F.embedding (and, tied, F.linear(h, E)); the model around
  them is ours against transformers, whose logits agree within a few ulps per op through 2-3 layers. Logits and
  the gradient of D are compared after dividing by the reference's largest entry, atol 1e-5, rtol 0 (the bound
  of the other methods' files: ten times a few ulps compounded over the layers). Measured (largest
  |ours - PEFT| / largest |PEFT|): logits and gradients 0.0 on all four parity cases (smollm tied, qwen3 untied,
  qwen3 with lm_head, gemma3 scaled embeddings), and 0.0 for the extended base against transformers and the
  adapter on it against PEFT (qwen3 untied, smollm tied, after add_tokens).
- Folders: saving and loading copy D bit for bit, so minicustom -> minicustom is exact and PEFT <-> minicustom
  keeps the parity tolerance.
- New rows: transformers' mean resizing is sampled with the same draws in the same order, so under one torch
  seed the extended embedding (and untied lm_head) equal transformers' bit for bit (torch.equal).
"""

import json

import peft_parity as pp
import pytest
import torch
from conftest import adamw_step_changes, make_checkpoint, token_ids, write_tokenizer
from peft import PeftModel, TrainableTokensConfig
from safetensors.torch import load_file
from test_cli_errors import fails

import minicustom as mc
from minicustom.cli import main
from minicustom.methods import apply_method, get_method
from minicustom.methods.trainable_tokens import TiedTokensHead, TrainableTokensLayer

TOKENS = [5, 17, 40, 99, 130]  # rows that the test ids (3..130) use
# Every D := N(0, 0.5²); PEFT's configs train TOKENS unless told.
TT = pp.Method("trainable tokens", "trainable_tokens", mc.apply_trainable_tokens, TrainableTokensConfig,
               (TrainableTokensLayer, TiedTokensHead), (".trainable_tokens_delta",), pp.normal(0.5),
               peft_defaults=dict(token_indices=TOKENS))


# -- invariants and the formula --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_identity_at_init_is_exact(tmp_path, family):
    path, _ = make_checkpoint(tmp_path / family, family)
    model = pp.exact_at_init(TT, path, token_indices=TOKENS)
    layer = model.model.embed_tokens
    assert torch.equal(layer.trainable_tokens_delta["default"], mc.load_model(path).model.embed_tokens.weight[TOKENS])
    assert isinstance(model.lm_head, TiedTokensHead) == (family == "smollm")  # tied: lm_head follows


def test_formula_by_hand():
    """E = E0 with E[I] := D per active adapter (disjoint indices), x = E[ids]; an untied head's logits h W'ᵀ + b
    with W'[I] := D; overlapping adapters are refused, as PEFT."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(11, 6)
    layer = TrainableTokensLayer(emb)
    layer.add("a", [2, 7], init_weights=False)
    layer.add("b", [0, 9, 3], init_weights=False)
    ids = torch.tensor([[0, 2, 3, 4, 7, 9, 10]])
    E = emb.weight.detach().clone()
    E[[2, 7]] = layer.trainable_tokens_delta["a"].detach()
    E[[0, 9, 3]] = layer.trainable_tokens_delta["b"].detach()
    layer.active = ["a", "b"]
    assert torch.equal(layer(ids), E[ids])
    layer.active = []
    assert torch.equal(layer(ids), emb(ids))

    head = torch.nn.Linear(6, 11)
    hl = TrainableTokensLayer(head)
    hl.add("a", [1, 4], init_weights=False)
    hl.active = ["a"]
    h = torch.randn(2, 3, 6)
    W = head.weight.detach().clone()
    W[[1, 4]] = hl.trainable_tokens_delta["a"].detach()
    torch.testing.assert_close(hl(h), h @ W.T + head.bias, atol=1e-6, rtol=1e-6)

    layer.add("c", [7, 8])
    layer.active = ["a", "c"]
    with pytest.raises(ValueError, match="adapters 'a' and 'c' both train token 7"):
        layer(ids)


def test_only_the_chosen_rows_train(ckpt, capsys):
    model = mc.apply_trainable_tokens(mc.load_model(ckpt), token_indices=TOKENS)
    n, _ = pp.trainable_shapes(model, {"model.embed_tokens.trainable_tokens_delta.default": (len(TOKENS), 72)})
    out = capsys.readouterr().out
    assert f"trainable tokens 'default': 5 tokens in model.embed_tokens (lm_head tied), trainable parameters {n:,}" in out


def test_base_bit_identical_after_an_adamw_step(tmp_path):
    for family in ("smollm", "qwen3"):
        path, _ = make_checkpoint(tmp_path / family, family)
        model = mc.apply_trainable_tokens(mc.load_model(path), token_indices=TOKENS, verbose=False).train()
        before = model.model.embed_tokens.trainable_tokens_delta["default"].detach().clone()
        assert adamw_step_changes(model, token_ids()) == ["model.embed_tokens.trainable_tokens_delta.default"]
        moved = (model.model.embed_tokens.trainable_tokens_delta["default"] != before).any(-1)
        assert moved.all()  # every chosen row is used by the ids, and its gradient moves it


def test_the_gradient_of_a_tied_row_sums_its_input_and_output_uses(ckpt):
    """Tied: D feeds the embedding and the logits; its gradient is the sum of both (the lm_head follows E)."""
    model = mc.apply_trainable_tokens(mc.load_model(ckpt), token_indices=TOKENS, verbose=False)
    ids = token_ids()
    model(ids).logsumexp(-1).sum().backward()
    both = model.model.embed_tokens.trainable_tokens_delta["default"].grad.clone()
    plain = mc.load_model(ckpt)
    W = plain.model.embed_tokens.weight  # tied: the one matrix
    plain(ids).logsumexp(-1).sum().backward()
    torch.testing.assert_close(both, W.grad[TOKENS], atol=1e-6, rtol=1e-5)


def test_disable_adapters_is_exactly_the_base(tmp_path):
    for family, targets in (("smollm", None), ("qwen3", ["embed_tokens", "lm_head"])):
        pp.disabling_gives_the_base(TT, make_checkpoint(tmp_path / family, family)[0], token_indices=TOKENS,
                                    targets=targets)


@pytest.mark.parametrize("family, targets", [("smollm", None), ("qwen3", ["embed_tokens", "lm_head"])])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_e0_exactly(tmp_path, family, targets):
    path, _ = make_checkpoint(tmp_path / family, family)
    base_keys = set(mc.load_model(path).state_dict())
    model = mc.apply_trainable_tokens(mc.load_model(path), token_indices=TOKENS, targets=targets, verbose=False)
    TT.perturb(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ids = token_ids()
    with torch.no_grad():
        before = model(ids)
        pp.adapter_matters(model, ids, before)
        mc.merge_adapters(model)
        assert torch.equal(model(ids), before)
        if family == "smollm":  # the tied lm_head sees the merged rows: it is the same matrix
            assert model.lm_head.weight is model.model.embed_tokens.weight
        mc.unmerge_adapters(model)
        for n, p in model.named_parameters():
            if n in w0:
                assert torch.equal(p, w0[n]), n
        plain = mc.merge_adapter(model)
        assert torch.equal(plain(ids), before)
    assert set(plain.state_dict()) == base_keys and TT.untouched(plain)
    assert (plain.lm_head.weight is plain.model.embed_tokens.weight) == (family == "smollm")


def test_cached_generate_equals_uncached_greedy_loop(ckpt):
    pp.generates_as_uncached(TT, ckpt, seq=torch.tensor([[5, 17, 40, 8, 99], [130, 3, 40, 40, 6]]),
                             token_indices=TOKENS)


# -- PEFT parity ------------------------------------------------------------------------------------

PARITY = {  # family, options on both sides (None targets: PEFT's default, the input embedding)
    "smollm-tied": ("smollm", None),
    "qwen3-untied": ("qwen3", None),
    "qwen3-with-lm_head": ("qwen3", ["embed_tokens", "lm_head"]),
    "gemma3-scaled": ("gemma3", None),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logits_and_gradients_match_peft(tmp_path, case):
    family, targets = PARITY[case]
    _, model, peft = pp.twins(TT, tmp_path, family, token_indices=TOKENS, targets=targets)
    pp.trains_as_peft(TT, model, peft, count=False)


def test_merging_matches_peft(tmp_path):
    """merge_and_unload on both sides: the same folded weights, bit for bit (rows are copied)."""
    _, model, peft = pp.twins(TT, tmp_path, "smollm", token_indices=TOKENS)
    pp.merged_as_peft(model, peft, exact=True)


# -- folders ----------------------------------------------------------------------------------------

FOLDERS = {"smollm-tied": ("smollm", None), "qwen3-untied": ("qwen3", None),
           "qwen3-with-lm_head": ("qwen3", ["embed_tokens", "lm_head"])}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_peft_loads_in_minicustom(tmp_path, case):
    family, targets = FOLDERS[case]
    model, peft, _ = pp.peft_folder_loads(TT, tmp_path, family, dict(targets=targets), same_params=False)
    assert set(TT.params(model)) == {n for n in TT.params(peft) if n != "lm_head.trainable_tokens_delta.default"
                                     or targets}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_adapter_saved_by_minicustom_loads_in_peft(tmp_path, case):
    """PeftModel.from_pretrained reads our folder and gives our logits; our folder loads back here bit for bit,
    merged or not."""
    family, targets = FOLDERS[case]
    pp.our_folder_loads(TT, tmp_path, family, dict(token_indices=TOKENS, targets=targets), same_params=False)


@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_folder_keys_and_config_are_peft_s(tmp_path, family):
    """The file holds exactly PEFT's keys and shapes (a tied lm_head's key too, the same rows; no
    trainable_tokens_original, which PEFT does not write), and adapter_config.json every field PEFT writes for
    TRAINABLE_TOKENS (but peft_version, which PEFT stamps itself), with the same values; auto_mapping None where
    PEFT names transformers' class (PeftModel.from_pretrained ignores it)."""
    path, hf = make_checkpoint(tmp_path / "hf", family)
    peft = TT.peft(hf)
    model = mc.apply_trainable_tokens(mc.load_model(path), token_indices=TOKENS, verbose=False)
    ours, theirs = pp.saved_as_peft_saves(model, peft, tmp_path, unordered=(), ours_differ=dict(auto_mapping=None))
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k  # D = E0[I] at init on both sides, the same base
    assert ("base_model.model.lm_head.trainable_tokens_delta" in ours) == (family == "smollm")


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(token_indices=[]), "token_indices is empty: name at least one token id"),
    (dict(token_indices=[3, 9, 3]), "token index 3 appears twice in token_indices"),
    (dict(token_indices=[3, -1]), "token_indices must be non-negative integers, found -1"),
    (dict(token_indices=[3, 131]), r"cannot attach trainable tokens: token index 131 is out of range: "
                                   r"model.embed_tokens has 131 rows \(0 to 130\)"),
    (dict(token_indices=[3], targets=["q_proj"]), "model.layers.0.self_attn.q_proj is a Linear; trainable tokens "
                                                  "adapt the embedding"),
    (dict(token_indices=[3], targets=["nope"]), "target 'nope' matches no module"),
    (dict(new_tokens=["<tool>"]), "new tokens need the tokenizer"),
])
def test_bad_options_are_one_line_before_anything_changes(ckpt, options, message):
    pp.attach_refused(TT, ckpt, options, message)


def test_the_registry_entry(setup):
    entry = get_method("trainable_tokens")
    assert entry.peft_type == "TRAINABLE_TOKENS" and entry.mergeable and entry.uses_tokenizer
    assert entry.defaults() == dict(token_indices=None, new_tokens=None, special_tokens=False, targets=None)
    _, path = setup
    tok = mc.load_tokenizer(path)
    model = apply_method(mc.load_model(path), "trainable_tokens", tokenizer=tok)  # ours: the special tokens
    assert model.adapter_configs["default"].token_indices == sorted(tok.special_ids) == [0, 1, 2, 3, 4]


@pytest.fixture
def saved(ckpt, tmp_path):
    return pp.saved_perturbed(TT, ckpt, tmp_path / "adapter", token_indices=TOKENS)


def test_a_folder_that_does_not_fit_is_refused_before_anything_changes(ckpt, saved):
    config, good = pp.folder_contents(saved)
    key, tied = (f"{pp.PREFIX}model.embed_tokens.trainable_tokens_delta", f"{pp.PREFIX}lm_head.trainable_tokens_delta")
    pp.each_folder_refused(TT, ckpt, saved, [  # (config, tensors, message)
        (config, {**good, key: torch.ones(5, 71), tied: torch.ones(5, 71)}, r"shape \(5, 71\), expected \(5, 72\)"),
        (config, {k: v for k, v in good.items() if k != key}, f"{key} is missing"),
        ({**config, "token_indices": [5, 17]}, good, r"shape \(5, 72\), expected \(2, 72\)"),
        ({**config, "token_indices": [5, 500]}, good, "token index 500 is out of range"),
        ({**config, "token_indices": [5, 5]}, good, "field 'token_indices': token index 5 appears twice"),
        ({**config, "token_indices": "5"}, good, "field 'token_indices': token_indices must be a list"),
        ({**config, "target_modules": ["q_proj"]}, good, "q_proj is a Linear; trainable tokens adapt the embedding"),
        ({**config, "init_weights": "yes"}, good, "field 'init_weights' must be true or false"),
        (config, {**good, tied: good[tied] + 1}, "lm_head.trainable_tokens_delta differs from the embedding's rows"),
        (config, {**good, f"{pp.PREFIX}model.norm.trainable_tokens_delta": torch.ones(5, 72)},
         r"1 keys match no trainable tokens embedding of this model .*model.norm.trainable_tokens_delta"),
    ])


# -- new tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["smollm", "qwen3"])
def test_new_rows_are_transformers_mean_resizing_draw_for_draw(tmp_path, family):
    """Under one torch seed, add_tokens gives the rows resize_token_embeddings (mean_resizing=True) gives: the
    embedding, and an untied lm_head from its own rows; the old rows are untouched."""
    path, hf = make_checkpoint(tmp_path / family, family)
    write_tokenizer(path)
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    ids = mc.add_tokens(model, tok, ["<tool>", "<think>"])
    assert ids == [tok.vocab_size - 2, tok.vocab_size - 1] and model.config.vocab_size == tok.vocab_size
    torch.manual_seed(7)
    hf.resize_token_embeddings(tok.vocab_size)
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (family == "smollm")
    assert torch.equal(model.model.embed_tokens.weight[:131], old["model.embed_tokens.weight"][:131])
    new = model.model.embed_tokens.weight[131:]
    assert (new - old["model.embed_tokens.weight"].mean(0)).abs().max() < 1e-3  # N(mean, 1e-9 Σ)


def test_new_tokens_are_added_as_transformers_adds_them(setup, tmp_path):
    """Our tokenizer after add_tokens (normal) or special=True encodes and decodes as transformers' after
    add_tokens / add_special_tokens; saved, AutoTokenizer reads it back the same."""
    from transformers import AutoTokenizer

    _, path = setup
    text = "Hi <tool>call(x)</tool> and<think>hmm</think> done <|im_end|>"
    for special in (False, True):
        tok = mc.load_tokenizer(path)
        ref = AutoTokenizer.from_pretrained(path)
        ids = tok.add_tokens(["<tool>", "</tool>", "<think>", "</think>"], special=special)
        if special:
            ref.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>", "<think>", "</think>"]})
        else:
            ref.add_tokens(["<tool>", "</tool>", "<think>", "</think>"])
        assert ids == ref.convert_tokens_to_ids(["<tool>", "</tool>", "<think>", "</think>"])
        assert tok.encode(text) == ref(text)["input_ids"]
        assert set(ids) <= set(tok.encode(text))
        for skip in (False, True):
            assert tok.decode(tok.encode(text), skip_special_tokens=skip) == ref.decode(ref(text)["input_ids"],
                                                                                         skip_special_tokens=skip)
        tok.save(tmp_path / str(special))
        back = AutoTokenizer.from_pretrained(tmp_path / str(special))
        assert back(text)["input_ids"] == tok.encode(text)
        assert back.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text), True)


@pytest.mark.parametrize("tokens, message", [
    (["<tool>", "a"], "new token 'a' is already in the vocabulary"),
    (["<tool>", "<|im_end|>"], "new token '<|im_end|>' is already in the vocabulary"),
    (["<tool>", ""], "a new token is empty or blank"),
    (["<tool>", "<think>", "<tool>"], "new token '<tool>' is given twice"),
])
def test_bad_new_tokens_are_one_line_before_anything_changes(setup, tokens, message):
    _, path = setup
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    n = tok.vocab_size
    for call in (lambda: mc.add_tokens(model, tok, tokens),
                 lambda: mc.apply_trainable_tokens(model, new_tokens=tokens, tokenizer=tok)):
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
        assert tok.vocab_size == n and model.config.vocab_size == 400 and TT.untouched(model)


def test_new_tokens_flow_from_the_command_line(setup, tmp_path, capsys):
    """`train sft --method trainable_tokens --new-tokens` adds the tokens before reading the data (each is one
    id in it), trains exactly their rows, and writes OUT/base: transformers loads that extended base and
    tokenizer (the same ids and logits as ours), and PEFT loads the adapter on it with our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, path = setup
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Use a tool for {c}.", "completion": f" <tool>{c}</tool>"}) + "\n"
                            for c in ["Paris", "Lima", "Oslo", "Cairo"] * 2))
    out = tmp_path / "run"
    main(["train", "sft", "--model", str(path), "--data", str(data), "--out", str(out), "--method",
          "trainable_tokens", "--new-tokens", "<tool>,</tool>", "--max-length", "64", "--batch-size", "2",
          "--max-steps", "3", "--lr", "1e-2", "--exact-match", "0", "--seed", "1"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["token_indices"] == [400, 401]
    assert config["base_model_name_or_path"] == str(out / "base")
    tensors = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        f"{pp.PREFIX}model.embed_tokens.trainable_tokens_delta": (2, 72), f"{pp.PREFIX}lm_head.trainable_tokens_delta": (2, 72)}

    base_tok, hf_tok = mc.load_tokenizer(out / "base"), AutoTokenizer.from_pretrained(out / "base")
    text = "Use <tool>Paris</tool>"
    assert base_tok.encode(text) == hf_tok(text)["input_ids"] and {400, 401} <= set(base_tok.encode(text))
    ids = torch.tensor([base_tok.encode(text)])
    ours_base = mc.load_model(out / "base")
    hf = AutoModelForCausalLM.from_pretrained(out / "base").eval()
    with torch.no_grad():
        pp.close(ours_base(ids), hf(input_ids=ids).logits, "extended base")
        old = mc.load_model(path)
        assert torch.equal(ours_base.model.embed_tokens.weight[:400], old.model.embed_tokens.weight)
    trained = tensors[f"{pp.PREFIX}model.embed_tokens.trainable_tokens_delta"]
    assert not torch.equal(trained, ours_base.model.embed_tokens.weight[400:])  # three steps moved the new rows

    model = mc.load_adapter(mc.load_model(out / "base"), out)
    peft = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        adapted = model(ids)
        pp.close(peft(input_ids=ids).logits, adapted, "adapter on the extended base")
        pp.adapter_matters(model, ids, adapted)
    main(["merge", "--model", str(out / "base"), "--adapter", str(out), "--out", str(tmp_path / "merged")])
    with torch.no_grad():  # the rows written into the tied matrix: exactly the adapted model
        assert torch.equal(mc.load_model(tmp_path / "merged")(ids), adapted)
    again = tmp_path / "again"
    err = fails(["train", "sft", "--model", path, "--data", data, "--out", again, "--method", "trainable_tokens",
                 "--new-tokens", "<tool>,a", "--max-steps", "1", "--exact-match", "0"], capsys)
    assert "new token 'a' is already in the vocabulary" in err and not (again / "base").exists()


def test_new_tokens_on_an_untied_model_train_both_rows_and_load_in_transformers_and_peft(tmp_path):
    """The Python flow on an untied model: apply_trainable_tokens(new_tokens=...) grows the embedding and the
    lm_head, trains the new rows of both (ours; PEFT's default would leave the lm_head's at their mean init),
    and save_extended_base + save_adapter give a folder pair that transformers and PEFT load with our logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minicustom.vocab import save_extended_base

    path, _ = make_checkpoint(tmp_path / "qwen3", "qwen3", vocab_size=400)
    write_tokenizer(path)
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    torch.manual_seed(3)
    mc.apply_trainable_tokens(model, new_tokens=["<tool>", "<think>"], tokenizer=tok, verbose=False)
    assert model.adapter_configs["default"].targets == ["embed_tokens", "lm_head"]
    assert sorted(TT.params(model)) == ["lm_head.trainable_tokens_delta.default",
                                      "model.embed_tokens.trainable_tokens_delta.default"]
    assert model.lm_head.weight.shape == (402, 64) and model.config.vocab_size == 402
    ids = torch.tensor([tok.encode("Paris <tool> Lima<think>")])
    assert {400, 401} <= set(ids[0].tolist())
    assert sorted(adamw_step_changes(model.train(), ids)) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    save_extended_base(model.eval(), tok, tmp_path / "base", source=path)
    mc.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "base")("Paris <tool> Lima<think>")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        out = model(ids)
        with mc.disable_adapters(model):
            pp.close(model(ids), hf(input_ids=ids).logits, "extended base")
        pp.close(PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids).logits, out, "adapter")
        assert torch.equal(mc.load_adapter(mc.load_model(tmp_path / "base"), tmp_path / "adapter")(ids), out)


def test_a_new_tokens_run_resumes_as_the_uninterrupted_one(setup, tmp_path, capsys):
    """--resume re-adds the tokens (the same seed: the same new rows, which the run record checks) and continues:
    a run cut after step 2 (its last checkpoint and its outputs removed) resumes to the adapter and OUT/base of
    the uninterrupted 3-step run, bit for bit."""
    import shutil

    root, path = setup
    argv = ["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--method", "trainable_tokens",
            "--new-tokens", "<tool>,<think>", "--max-length", "64", "--batch-size", "2", "--lr", "1e-2",
            "--exact-match", "0", "--save-every", "1", "--max-steps", "3"]
    once, cut = tmp_path / "once", tmp_path / "cut"
    main([*argv, "--out", str(once)])
    shutil.copytree(once, cut)
    shutil.rmtree(cut / "base")
    shutil.rmtree(cut / "checkpoints" / "checkpoint-000003")
    (cut / "checkpoints" / "latest").write_text("checkpoint-000002\n")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (cut / name).unlink()
    capsys.readouterr()
    main([*argv, "--out", str(cut), "--resume"])
    err = capsys.readouterr().err
    assert "checkpoint-000002 (step 2 of 3)" in err and "step 1/3" not in err  # it resumed: step 3 alone ran
    for name in ("adapter_model.safetensors", "base/model.safetensors"):
        a, b = load_file(once / name), load_file(cut / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_new_tokens_are_refused_by_the_trainers_that_read_data_first(setup, tmp_path, capsys):
    root, path = setup
    err = fails(["train", "dpo", "--model", path, "--data", root / "train.jsonl", "--out", tmp_path / "dpo",
                 "--method", "trainable_tokens", "--new-tokens", "<tool>"], capsys)
    assert "--new-tokens is taken by train sft" in err and not (tmp_path / "dpo").exists()
    err = fails(["train", "rm", "--model", path, "--data", root / "train.jsonl", "--out", tmp_path / "rm",
                 "--method", "trainable_tokens", "--new-tokens", "<tool>"], capsys)
    assert "--new-tokens is taken by train sft" in err and not (tmp_path / "rm").exists()


def test_special_new_tokens_from_the_command_line(setup, tmp_path):
    """--special-tokens adds them as add_special_tokens does: transformers' tokenizer read from OUT/base drops
    them when decoding with skip_special_tokens, and lists them among its special tokens."""
    from transformers import AutoTokenizer

    root, path = setup
    out = tmp_path / "run"
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(out), "--method",
          "trainable_tokens", "--new-tokens", "<ctl>", "--special-tokens", "--max-length", "64", "--batch-size", "2",
          "--max-steps", "1", "--exact-match", "0"])
    hf_tok, tok = AutoTokenizer.from_pretrained(out / "base"), mc.load_tokenizer(out / "base")
    ids = tok.encode("a<ctl>b")
    assert 400 in ids and 400 in tok.special_ids and "<ctl>" in hf_tok.all_special_tokens
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True) == "ab"
