"""llama.cpp (llama-cpp-python, built from its PyPI source) as the real reader of export-gguf's files, and
transformers as a second one, on SmolLM2-135M-Instruct with a LoRA adapter trained here.

- f16 export: llama.cpp's greedy 32 tokens equal minicustom's merged model on three chat prompts, each
  prompt formatted by llama.cpp's own Jinja chat formatter from the file's template; its logits agree
  within a tolerance derived below from f16 rounding.
- q8_0 / q4_0: every tensor's bytes are the gguf package's quantizer's on the merged weights, and llama.cpp
  still answers the capital of France.
- the LoRA-only file on the base f16 export (llama.cpp applies it at load) gives the merged f16 tokens.
- transformers' GGUF loader reads the f32 export (logits within 1e-4, the same template ids), and
  convert-gguf gives the merged weights back bit for bit.
"""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minicustom import load_model, load_tokenizer
from minicustom.cli import main
from minicustom.cli_common import demo_model
from minicustom.gguf import convert_gguf
from minicustom.gguf_export import gguf_name, permute, tensor_type
from minicustom.methods import merge_adapter
from minicustom.methods.registry import load_adapter

llama_cpp = pytest.importorskip("llama_cpp")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
CHATS = [
    [{"role": "system", "content": "Answer with the name of the city only."},
     {"role": "user", "content": "Which city is mentioned? The train to Lisbon leaves at noon."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A LoRA adapter trained on the city task, the merged model, and every export of it."""
    root, base = tmp_path_factory.mktemp("llama_cpp"), demo_model()
    adapter = root / "adapter"
    main(["train", "sft", "--model", base, "--data", ROOT / "examples/data/tasks/city/train.jsonl", "--out", adapter,
          "--max-steps", "6", "--batch-size", "4", "--max-length", "128", "--lr", "1e-3", "--exact-match", "0",
          "--save-every", "0"])
    files = {}
    for name, extra in {"f16": ["--outtype", "f16"], "f32": ["--outtype", "f32"], "q8_0": ["--outtype", "q8_0"],
                        "q4_0": ["--outtype", "q4_0"], "lora": ["--lora-only"]}.items():
        files[name] = root / f"{name}.gguf"
        main(["export-gguf", "--model", base, "--adapter", adapter, "--out", files[name], *extra])
    files["base-f16"] = root / "base-f16.gguf"
    main(["export-gguf", "--model", base, "--out", files["base-f16"], "--outtype", "f16"])
    merged = merge_adapter(load_adapter(load_model(base), adapter)).eval()
    return {"root": root, "base": base, "files": files, "merged": merged, "tok": load_tokenizer(base)}


def llama(path, **options):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0, **options)


def llama_prompt(llm, messages) -> list[int]:
    """The prompt ids as llama-cpp-python's chat completion builds them: the file's Jinja template rendered by
    its own formatter, tokenized with special tokens parsed (the template wrote any BOS itself)."""
    eos, bos = (llm._model.token_get_text(i) for i in (llm.token_eos(), llm.token_bos()))  # as Llama() does
    result = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)(
        messages=messages)
    return llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)


def llama_greedy(llm, ids, n=32) -> tuple[list[int], np.ndarray]:
    """n greedy tokens (fewer at EOS) from llama.cpp's own logits, and the logits of every position (`llm`
    made with logits_all=True: llama-cpp-python keeps a row per position only then)."""
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llm.token_is_eog(token) if hasattr(llm, "token_is_eog") else token == llm.token_eos():
            break
        new.append(token)
        llm.eval([token])
    return new, np.array(llm.scores[:llm.n_tokens])


def ours_greedy(model, tok, ids, n=32) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, stop=[tok.eos_token_id])[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] == tok.eos_token_id else out


@pytest.fixture(scope="module")
def f16_answers(exports):
    llm = llama(exports["files"]["f16"], logits_all=True)
    rows = []
    for chat in CHATS:
        ids = llama_prompt(llm, chat)
        rows.append((ids, *llama_greedy(llm, ids)))
    return rows


def test_f16_greedy_tokens_equal_the_merged_model(exports, f16_answers):
    tok, merged = exports["tok"], exports["merged"]
    base = load_model(exports["base"]).eval()
    differs = False
    for chat, (ids, tokens, _) in zip(CHATS, f16_answers):
        assert ids == tok.apply_chat_template(chat, add_generation_prompt=True)  # llama.cpp's formatting
        ours = ours_greedy(merged, tok, ids)
        assert tokens == ours, (tok.decode(tokens), tok.decode(ours))
        differs |= ours != ours_greedy(base, tok, ids)
        print(f"\n{chat[-1]['content']!r} -> llama.cpp f16: {tok.decode(tokens)!r}")
    assert differs  # the adapter changed some answer: the merge is in the file


def test_f16_logits_within_the_rounding_of_f16(exports, f16_answers):
    """ggml's f16 matmul rounds both operands to f16: the weights (stored so) and the activations. An
    emulation that rounds the weights, every linear input and the keys and values (llama.cpp's f16 KV cache;
    here before RoPE, a rounding of the same size) to f16 measures what those roundings move the logits (d);
    llama.cpp also sums in another order and with other kernels per CPU, so its distance from the fp32 model
    is bounded by 2 d. (With K and V left in fp32, d missed a third of the rounding: on an AVX2-only CPU
    llama.cpp's gap came out 1.02 times that 2 d.)"""
    merged = exports["merged"]
    emulated = load_adapter(load_model(exports["base"]), exports["root"] / "adapter")
    emulated = merge_adapter(emulated).eval()
    with torch.no_grad():
        for p in emulated.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    hooks = [m.register_forward_pre_hook(lambda m, args: (args[0].half().float(),))
             for m in emulated.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(lambda m, args, out: out.half().float())
              for name, m in emulated.named_modules() if name.endswith(("k_proj", "v_proj"))]
    for ids, tokens, scores in f16_answers:
        sequence = torch.tensor([ids + tokens])
        with torch.no_grad():
            exact, rounded = merged(sequence)[0], emulated(sequence)[0]
        d = (rounded - exact).abs().max().item()
        gap = (torch.from_numpy(scores) - exact).abs().max().item()
        print(f"\nf16 logits: llama.cpp vs fp32 {gap:.4f}, f16 emulation vs fp32 {d:.4f} (bound 2d = {2 * d:.4f})")
        assert 0 < gap <= 2 * d
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_files_hold_ggufs_bytes_and_answer(exports, outtype):
    merged, config = exports["merged"], exports["merged"].config
    reader = gguf.GGUFReader(exports["files"][outtype])
    stored = {t.name: t for t in reader.tensors}
    state = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    assert len(stored) == len(state)
    for hf, w in state.items():
        name = gguf_name(hf)
        if ".q_proj." in hf:
            w = permute(w, config.num_attention_heads)
        elif ".k_proj." in hf:
            w = permute(w, config.num_key_value_heads)
        kind = tensor_type(name, w, outtype, "token_embd.weight")
        t = stored[name]
        assert t.tensor_type == kind, name
        expected = w.numpy() if w.dim() == 1 else gguf.quants.quantize(w.float().numpy(), kind)
        assert t.data.tobytes() == expected.tobytes(), name
    llm = llama(exports["files"][outtype])
    answer = llm.create_chat_completion(messages=CHATS[1], temperature=0, max_tokens=24)
    text = answer["choices"][0]["message"]["content"]
    print(f"\n{outtype}: {text!r}")
    assert "Paris" in text


def test_lora_gguf_on_the_base_gives_the_merged_tokens(exports, f16_answers):
    llm = llama(exports["files"]["base-f16"], lora_path=str(exports["files"]["lora"]), logits_all=True)
    for (ids, tokens, _) in f16_answers:
        assert llama_greedy(llm, ids)[0] == tokens


def test_transformers_reads_the_f32_export(exports):
    transformers = pytest.importorskip("transformers")
    file, tok, merged = exports["files"]["f32"], exports["tok"], exports["merged"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    for chat in CHATS:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True)
        assert hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, merged(x), rtol=0, atol=1e-4)


def test_convert_gguf_gives_the_merged_weights_back(exports, tmp_path):
    merged, tok = exports["merged"].state_dict(), exports["tok"]
    for outtype in ("f32", "f16"):
        back = convert_gguf(exports["files"][outtype], tmp_path / outtype, progress=False)
        weights = load_file(back / "model.safetensors")
        for k, v in merged.items():
            if k != "lm_head.weight":
                expected = v if outtype == "f32" or v.dim() == 1 else v.half().float()
                assert torch.equal(weights[k], expected), (outtype, k)
        tok2 = load_tokenizer(back)
        text = (ROOT / "README.md").read_text()[:4000]
        assert tok2.encode(text) == tok.encode(text)
        for chat in CHATS:
            assert tok2.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
                chat, add_generation_prompt=True)
        assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True


def test_gemma3_270m_exports_with_its_sentencepiece_vocabulary(tmp_path):
    """The second real model: a SentencePiece-style vocabulary (llama.cpp's "llama" tokenizer, scores from the
    vocabulary's order, byte pieces, no space prefix). llama.cpp tokenizes as minicustom does, and its greedy
    tokens and logits (fp32 K/V cache; GeGLU against ggml's f16 GELU table emulated, held to that table's
    whole effect, as in test_gguf_export) are minicustom's."""
    from conftest import MIXED
    from test_gguf_export import _ggml_gelu

    from minicustom.gguf import fetch_demo_model

    path = fetch_demo_model(install=False, name="gemma3-270m")
    model, tok = load_model(path).eval(), load_tokenizer(path)
    main(["export-gguf", "--model", path, "--out", tmp_path / "g.gguf", "--outtype", "f32"])
    llm = llama(tmp_path / "g.gguf", logits_all=True, type_k=0, type_v=0)
    for text in [MIXED[:600], "  two leading spaces\tand a tab", "Ünïcödé café 日本語 🤖"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text)
    ids = tok.apply_chat_template(CHATS[1], add_generation_prompt=True)
    assert llama_prompt(llm, CHATS[1]) == ids
    tokens, scores = llama_greedy(llm, ids, 16)
    assert tokens == ours_greedy(model, tok, ids, 16)
    sequence = torch.tensor([ids + tokens])
    with torch.no_grad():
        exact = model(sequence)[0]
        for m in model.modules():
            if hasattr(m, "act"):
                m.act = _ggml_gelu
        emulated = model(sequence)[0]
    gap, tol = (torch.from_numpy(scores) - emulated).abs().max().item(), (emulated - exact).abs().max().item()
    print(f"\nGemma 3 270M f32: llama.cpp vs minicustom {gap:.2e} (bound {tol:.2e}), {tok.decode(tokens)!r}")
    assert gap <= tol
