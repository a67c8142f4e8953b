"""export-gguf on tiny checkpoints: round trips through convert-gguf, the quantizers' bytes, the LoRA GGUF's
arithmetic, transformers' GGUF loader as a second reader, the Modelfile, and every refusal. llama.cpp itself
reads the real model's exports in test_llama_cpp.py."""

import math

import gguf
import numpy as np
import pytest
import torch
from conftest import MIXED, TEMPLATE, fused_copy, make_checkpoint, make_hf_model, write_tokenizer
from safetensors.torch import load_file

from minicustom import load_model, load_tokenizer
from minicustom.cli import main
from minicustom.cli_common import CommandError
from minicustom.gguf import _unpermute, convert_gguf
from minicustom.gguf_export import ExportError, export_gguf, export_lora_gguf, modelfile, permute
from minicustom.methods import merge_adapter, save_adapter
from minicustom.methods.lora import apply_lora

EXPORTABLE = ["smollm", "llama-bias", "mistral", "qwen2", "qwen3", "phi3"]  # convert-gguf reads them back exactly


def tiny(tmp_path, family="smollm", **overrides):
    overrides = {"vocab_size": 400, **({"sliding_window": None} if family == "mistral" else {}), **overrides}
    path, _ = make_checkpoint(tmp_path / family, family, **overrides)
    write_tokenizer(path)
    return path


def tensors(file):
    reader = gguf.GGUFReader(file)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


def test_permute_inverts_the_importers_unpermute():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(_unpermute(permute(w, 6), 6), w) and not torch.equal(permute(w, 6), w)
    # head 0's rows [x0..x3, y0..y3] become [x0, y0, x1, y1, ...]: llama.cpp's interleaved rotary pairs
    assert permute(torch.arange(8.0)[:, None], 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("family", EXPORTABLE)
def test_f32_round_trip_is_bit_exact(tmp_path, family):
    path = tiny(tmp_path, family)
    model, tok = load_model(path), load_tokenizer(path)
    export_gguf(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    back = convert_gguf(tmp_path / "m.gguf", tmp_path / "back", progress=False)
    ours, theirs = model.state_dict(), load_file(back / "model.safetensors")
    if model.config.tie_word_embeddings:
        ours.pop("lm_head.weight")
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    tok2 = load_tokenizer(back)
    assert tok2.encode(MIXED) == tok.encode(MIXED)
    assert tok2.encode(MIXED, add_special_tokens=False) == tok.encode(MIXED, add_special_tokens=False)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_end|> there"}]
    assert tok2.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
        chat, add_generation_prompt=True)
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert tok2.chat_template == TEMPLATE
    ids = torch.tensor([tok.encode(MIXED[:200])])
    assert torch.equal(load_model(back)(ids), model(ids))


def test_f16_and_bf16_store_the_rounded_weights(tmp_path):
    path = tiny(tmp_path, "llama-bias")
    model, tok = load_model(path), load_tokenizer(path)
    for outtype, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        types = export_gguf(model, tok, tmp_path / f"{outtype}.gguf", outtype, progress=False)
        assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
        assert types["blk.0.attn_q.bias"] == "F32"
        back = load_file(convert_gguf(tmp_path / f"{outtype}.gguf", tmp_path / outtype, progress=False)
                         / "model.safetensors")
        for k, v in model.state_dict().items():
            expected = v if v.dim() == 1 else v.to(dtype).float()
            assert torch.equal(back[k], expected), (outtype, k)


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_bytes_are_the_gguf_quantizers(tmp_path, outtype):
    path = tiny(tmp_path, "smollm", intermediate_size=96, hidden_size=72)
    model, tok = load_model(path), load_tokenizer(path)
    export_gguf(model, tok, tmp_path / "q.gguf", outtype, progress=False)
    reader, by_name = tensors(tmp_path / "q.gguf")
    T = gguf.GGMLQuantizationType
    kind = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[outtype]
    state, cfg = model.state_dict(), model.config
    for hf, w in state.items():
        if hf == "lm_head.weight":
            continue
        name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(hf)
        if name is None:
            layer, rest = hf.split(".")[2], ".".join(hf.split(".")[3:-1])
            name = f"blk.{layer}." + {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                                      "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                                      "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                                      "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                                      "post_attention_layernorm": "ffn_norm"}[rest] + ".weight"
        if "attn_q." in name:
            w = permute(w, cfg.num_attention_heads)
        elif "attn_k." in name:
            w = permute(w, cfg.num_key_value_heads)
        t = by_name[name]
        if w.dim() == 1:
            assert t.tensor_type == T.F32 and np.array_equal(t.data, w.numpy()), name
            continue
        # q4_0 keeps the output matrix (here the tied embedding) at Q8_0, as llama-quantize keeps it higher
        # and a matrix whose rows are not whole blocks of 32 (hidden 72 here) falls back to F16
        want = T.Q8_0 if outtype == "q4_0" and name == "token_embd.weight" else kind
        want = want if w.shape[-1] % 32 == 0 else T.F16
        assert t.tensor_type == want, name
        expected = gguf.quants.quantize(w.numpy(), want)
        assert t.data.tobytes() == expected.tobytes(), name
    assert field(reader, "general.file_type") == {"q8_0": 7, "q4_0": 2}[outtype]
    kinds = {t.tensor_type for t in by_name.values()}
    assert {kind, T.F16, T.F32} <= kinds  # down_proj (rows of 96) quantized, the rest of width 72 in F16


def test_a_merged_adapter_is_what_is_written(tmp_path):
    path = tiny(tmp_path, "smollm")
    model = load_model(path)
    apply_lora(model, r=4, alpha=8, verbose=False)
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    merged = merge_adapter(model)
    main(["export-gguf", "--model", path, "--adapter", tmp_path / "adapter", "--out", tmp_path / "m.gguf",
          "--outtype", "f32"])
    back = load_file(convert_gguf(tmp_path / "m.gguf", tmp_path / "back", progress=False) / "model.safetensors")
    for k, v in merged.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(back[k], v), k
    assert not torch.equal(back["model.layers.0.self_attn.q_proj.weight"],
                           load_model(path).state_dict()["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_lora_gguf_gives_llama_cpps_sum(tmp_path, variant):
    """llama.cpp adds (alpha / r) B A with r = lora_b's width: W + that, permuted as the base is, equals
    the merged weight the base GGUF would hold."""
    path = tiny(tmp_path, "smollm")
    model = load_model(path)
    extra = {"rslora": dict(use_rslora=True), "plain": {},
             "patterns": dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})}[variant]
    apply_lora(model, r=4, alpha=6, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], verbose=False,
               **extra)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    report = export_lora_gguf(tmp_path / "adapter", model.config, tmp_path / "lora.gguf")
    reader, by_name = tensors(tmp_path / "lora.gguf")
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    alpha = field(reader, "adapter.lora.alpha")
    assert alpha == pytest.approx(6 * math.sqrt(4) if variant == "rslora" else 6, rel=1e-7) == report["alpha"]
    base = load_model(path).state_dict()
    merged = merge_adapter(model).state_dict()
    cfg = model.config
    for hf, gname in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("mlp.down_proj", "ffn_down")):
        for layer in range(cfg.num_hidden_layers):
            a = torch.from_numpy(by_name[f"blk.{layer}.{gname}.weight.lora_a"].data.copy())
            b = torch.from_numpy(by_name[f"blk.{layer}.{gname}.weight.lora_b"].data.copy())
            assert a.shape[1] == cfg.hidden_size if gname != "ffn_down" else cfg.intermediate_size
            rank = a.shape[0]
            key = f"model.layers.{layer}.{hf}.weight"
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(gname)
            W, merged_W = (base[key], merged[key]) if heads is None else (permute(base[key], heads),
                                                                          permute(merged[key], heads))
            torch.testing.assert_close(W + alpha / rank * b @ a, merged_W, rtol=0, atol=1e-6)
    assert "blk.0.ffn_up.weight.lora_a" not in by_name


# transformers' GGUF reader drops llama's biases and gives qwen3 Qwen3Config's default head_dim (128): the
# families it reads as written
@pytest.mark.parametrize("family", ["smollm", "mistral", "qwen2"])
def test_transformers_reads_the_f32_export(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    path = tiny(tmp_path, family)
    model, tok = load_model(path), load_tokenizer(path)
    export_gguf(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([tok.encode(MIXED[:300])])
    torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)


def test_modelfile_recognizes_chatml_and_its_default_system(tmp_path):
    class Tok:
        eos_token = "<|im_end|>"
        chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                         "Be kind.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            import jinja2
            return jinja2.Template(self.chat_template).render(messages=messages,
                                                              add_generation_prompt=add_generation_prompt)

    text, note = modelfile(Tok(), "./m.gguf")
    assert note == ""
    assert text.splitlines()[0] == "FROM ./m.gguf" and 'TEMPLATE """{{- range .Messages }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Be kind."""' in text
    assert 'SYSTEM """Terse."""' in modelfile(Tok(), "./m.gguf", system="Terse.")[0]
    with pytest.raises(ExportError, match='"""'):
        modelfile(Tok(), "./m.gguf", system='a """ b')
    path = tiny(tmp_path)  # the test tokenizer's template writes BOS first: not ChatML
    text, note = modelfile(load_tokenizer(path), "./m.gguf")
    assert "TEMPLATE" not in text and "GGUF's chat template" in note


def test_ollama_writes_the_modelfile_beside_the_file(tmp_path):
    path = tiny(tmp_path)
    main(["export-gguf", "--model", path, "--out", tmp_path / "out/m.gguf", "--ollama", "--system", "Hi."])
    assert (tmp_path / "out/Modelfile").read_text().startswith("FROM ./m.gguf\n")


def refused(capsys, *argv, match):
    capsys.readouterr()  # what building the checkpoints printed
    with pytest.raises(CommandError):
        main(["export-gguf", *map(str, argv)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err
    return err


def test_bad_requests_are_refused_and_nothing_is_written(tmp_path, capsys):
    path = tiny(tmp_path)
    out = tmp_path / "m.gguf"
    refused(capsys, "--model", path, "--out", tmp_path / "m.bin", match="*.gguf")
    refused(capsys, "--model", path, "--out", path / "m.gguf", match="inside the input folder")
    refused(capsys, "--model", path, "--out", out, "--lora-only", match="give --adapter")
    out.write_bytes(b"keep me")
    refused(capsys, "--model", path, "--out", out, match="--overwrite")
    assert out.read_bytes() == b"keep me"
    moe = tiny(tmp_path, "qwen3moe")  # layer 1 is dense (mlp_only_layers)
    refused(capsys, "--model", moe, "--out", tmp_path / "x.gguf", match="has dense layers")
    longrope = tiny(tmp_path, "phi4mini")
    refused(capsys, "--model", longrope, "--out", tmp_path / "x.gguf", match="rope_scaling 'longrope'")
    yarn = tiny(tmp_path, "qwen3-yarn", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                                             original_max_position_embeddings=64, attention_factor=1.5))
    refused(capsys, "--model", yarn, "--out", tmp_path / "x.gguf", match="{'attention_factor': 1.5}")
    # what llama.cpp's gemma3 hard-codes: scores scaled by head_dim^-1/2, every sixth layer global
    gemma = tiny(tmp_path, "gemma3")
    refused(capsys, "--model", gemma, "--out", tmp_path / "x.gguf", match="query_pre_attn_scalar is 20")
    gemma = tiny(tmp_path / "g", "gemma3", query_pre_attn_scalar=16)
    refused(capsys, "--model", gemma, "--out", tmp_path / "x.gguf", match="layer_types is ['sliding_attention', "
            "'full_attention', 'sliding_attention']; llama.cpp's gemma3 assumes")
    assert not (tmp_path / "x.gguf").exists()


def test_adapters_without_a_lora_form_are_refused(tmp_path, capsys):
    from minicustom.methods.prefix import apply_prefix

    path = tiny(tmp_path)
    dora = load_model(path)
    apply_lora(dora, r=2, use_dora=True, verbose=False)
    save_adapter(dora, tmp_path / "dora")
    refused(capsys, "--model", path, "--adapter", tmp_path / "dora", "--out", tmp_path / "d.gguf", "--lora-only",
            match="DoRA adapter has no llama.cpp LoRA form")
    prefix = load_model(path)
    apply_prefix(prefix, num_virtual_tokens=2)
    save_adapter(prefix, tmp_path / "prefix")
    refused(capsys, "--model", path, "--adapter", tmp_path / "prefix", "--out", tmp_path / "p.gguf",
            match="nothing to fold")
    refused(capsys, "--model", path, "--adapter", tmp_path / "prefix", "--out", tmp_path / "p.gguf", "--lora-only",
            match="no llama.cpp LoRA form")
    assert not list(tmp_path.glob("*.gguf"))


def test_an_unknown_pre_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers

    path = tiny(tmp_path)
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
    with pytest.raises(ExportError, match="pre_tokenizer \\(Whitespace\\)"):
        export_gguf(load_model(path), load_tokenizer(path), tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizers_get_llama_cpps_names():
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from minicustom.gguf_export import pre_tokenizer_name
    from minicustom.gguf_vocab import PRE_TOKENIZERS

    def spec(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())

    def split(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    assert pre_tokenizer_name(spec(pre_tokenizers.ByteLevel(add_prefix_space=False)), "t") == "gpt-2"
    assert pre_tokenizer_name(spec(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                            pre_tokenizers.ByteLevel()])), "t") == "smollm"
    assert pre_tokenizer_name(spec(split(PRE_TOKENIZERS["llama3"][1])), "t") == "llama-bpe"
    assert pre_tokenizer_name(spec(split(PRE_TOKENIZERS["qwen2"][1])), "t") == "qwen2"
    with pytest.raises(ExportError, match="Split \\+ ByteLevel"):
        pre_tokenizer_name(spec(split(r"\w+")), "t")


def _ggml_gelu(x):
    """ggml_vec_gelu_f32 with GGML_GELU_FP16 (ggml-cpu's default): 0 below -10, x above 10, else its table of
    tanh-GELU at every f16 value, looked up at x rounded to f16 (the table's entries are f16 too)."""
    table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


# Gemma as llama.cpp computes it: scores scaled by head_dim^-1/2, its fixed sliding/global layer pattern
LLAMA_CPP_SHAPES = {
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16, num_hidden_layers=6,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "llama3": {},  # its llama3 RoPE as the rope_freqs tensor
    "qwen3-yarn": {},
    "qwen3moe": dict(mlp_only_layers=[]),  # llama.cpp's qwen3moe has experts in every layer
    "mixtral": dict(sliding_window=None),  # llama.cpp runs Mixtral as `llama`, which has no window
}


@pytest.mark.parametrize("family, fused", [(f, False) for f in EXPORTABLE + list(LLAMA_CPP_SHAPES)]
                         + [("qwen3moe", True), ("mixtral", True)])
def test_llama_cpp_runs_the_f32_export_of_each_family(tmp_path, family, fused):
    """llama.cpp's own forward on the f32 file: every family's names, q/k order, biases, q/k norms, fused
    projections, Gemma's norms, caps and windows as it reads them. Both sides compute in fp32 from the same
    weights (an fp32 K/V cache asked for), so only summation order differs: within 1e-4 of the largest
    logit. GeGLU families: ggml's GELU reads an f16 table (_ggml_gelu), so they are compared with that
    emulated; summation-order differences upstream still land some inputs on neighbouring f16 steps, so
    they are held to what the whole table's rounding moves the logits (emulated vs exact GELU)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tiny(tmp_path, family, **LLAMA_CPP_SHAPES.get(family, {}))
    if fused:  # the experts as transformers 5 holds them: 3-D gate_up_proj and down_proj
        path = fused_copy(path, make_hf_model(family, **LLAMA_CPP_SHAPES[family], vocab_size=400))
    model, tok = load_model(path), load_tokenizer(path)
    assert model.config.fused_experts == fused
    export_gguf(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    f32 = 0  # GGML_TYPE_F32: the K/V cache in fp32 too (llama.cpp's default f16 rounds K and V)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, logits_all=True,
                          verbose=False, type_k=f32, type_v=f32)
    ids = tok.encode(MIXED[:200])[:100]
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        tol = 1e-4 * ours.abs().max().item()
        if model.config.hidden_act != "silu":
            exact = ours
            for m in model.modules():
                if hasattr(m, "act"):
                    m.act = _ggml_gelu
            ours = model(torch.tensor([ids]))[0]
            tol = (ours - exact).abs().max().item()
    print(f"\n{family}: llama.cpp vs minicustom, max |diff| {(theirs - ours).abs().max():.2e}, tolerance {tol:.2e}")
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)


def write_sentencepiece_tokenizer(path):
    """A Llama-2-style tokenizer.json: BPE over "▁"-spaced pieces with byte fallback (<0x00>..<0xFF> after
    <unk> <s> </s>), "▁" prepended and spaces replaced by the normalizer, BOS added; its merges are every
    split of a piece into two pieces ranked by the piece's place, as SentencePiece vocabularies convert."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_tok.train_from_iterator([MIXED[:2000]] * 3, trainers.BpeTrainer(vocab_size=380, special_tokens=[]))
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda kv: kv[1])
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [t for t, _ in learned if t not in pieces]
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = sorted((rank, -i, t[:i], t[i:]) for t, rank in vocab.items() if not t.startswith("<")
                    for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}')
    return len(pieces)


@pytest.mark.parametrize("family", ["llama-bias", "phi3"])
def test_llama_cpp_tokenizes_a_sentencepiece_vocabulary_as_minicustom(tmp_path, family):
    """Llama 2's and Phi-3's kind of vocabulary (space prefix, byte pieces), written as llama.cpp's "llama"
    tokenizer: the same ids for mixed text (bytes outside the pieces included), and the same logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _ = make_checkpoint(tmp_path / family, family, vocab_size=640)
    n = write_sentencepiece_tokenizer(path)
    model, tok = load_model(path), load_tokenizer(path)
    assert n <= 640 and tok.encode("日本語")[1:4] != [0, 0, 0]  # unknown characters fall back to byte pieces
    export_gguf(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    reader, _ = tensors(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.add_space_prefix")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    for text in MIXED.split("\n")[:6] + ["  two spaces", "tab\there", "Ünïcödé 日本語 🤖"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text), text
    ids = tok.encode(MIXED[:150])
    llm.eval(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 * ours.abs().max().item())


def test_a_4bit_model_exports_its_dequantized_weights(tmp_path):
    """--quantize nf4 with no adapter: what the file holds is each 4-bit layer's dequantized weight."""
    from minicustom.quant.linear4bit import Linear4bit

    path = tiny(tmp_path, "llama-bias")
    four = load_model(path, quantize="nf4")
    expected = {f"{n}.weight": m.dequantize(torch.float32) for n, m in four.named_modules() if isinstance(m, Linear4bit)}
    assert expected
    main(["export-gguf", "--model", path, "--quantize", "nf4", "--out", tmp_path / "m.gguf", "--outtype", "f32"])
    back = load_file(convert_gguf(tmp_path / "m.gguf", tmp_path / "back", progress=False) / "model.safetensors")
    for name, w in expected.items():
        assert torch.equal(back[name], w), name
    assert torch.equal(back["model.layers.0.self_attn.q_proj.bias"], four.state_dict()["model.layers.0.self_attn.q_proj.bias"])
