"""Every number, table and figure of the walkthroughs in docs/walkthroughs/, and the walkthroughs themselves.

    python docs/walkthroughs/make_figures.py            # SmolLM2-135M-Instruct: rewrites docs/walkthroughs/
    python docs/walkthroughs/make_figures.py --smoke    # (or MINICUSTOM_SMOKE=1) a tiny random model, temp folder
    python docs/walkthroughs/make_figures.py --render   # the pages again from figures/numbers.json, no model run

Design: the prose lives in templates/<page>.md.in; this script computes the numbers (figures/numbers.json, one
string per key), draws the figures (figures/*.png) and renders each template into <page>.md. A template holds
four kinds of placeholders, so that neither a number nor a line number is ever typed by hand:

    {{key}}                           a number or a table of numbers.json
    {{ref PATH NAME}}                 `PATH:LINE` (`NAME`): the line of def/class/assignment NAME, found by ast
    {{quote PATH NAME "TEXT" [N]}}    `PATH:A-B` (in `NAME`): then a code block of N lines of NAME (default 1),
                                      the first the line of NAME that contains TEXT
    {{line PATH NAME "TEXT"}}         `PATH:A` (in `NAME`): `that line`, for table cells

The line numbers are computed when the page is rendered, so `--render` brings the pages back in step with the
code in seconds; tests/test_walkthroughs.py fails when a committed page is not what the templates render now
(a moved function, a changed quoted line), checks every reference against the code on its own, and runs this
script in smoke mode. The numbers themselves change only when this script is run again on the model.

The full run takes under a minute on SmolLM2-135M-Instruct (`minicustom fetch-demo-model`) and matplotlib (the
`plot` extra). It runs on one thread: the numbers do not depend on the machine's core count, and a busy machine
does not stall it (two threads beside another job made a LoRA step 10-30x slower here). The smoke model is a
random 2-layer Llama with a byte-level BPE tokenizer of 300 tokens trained on the records below and a ChatML
template, written to a temporary folder (tests/conftest.py builds its models with transformers, test-only).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minicustom as mc
from minicustom.cli_common import demo_model
from minicustom.data import IGNORE, collate, make_example, make_pair, pad_id_for
from minicustom.losses import group_advantages, preference_loss, reward_loss, sequence_logps, sft_loss
from minicustom.methods import peft_format
from minicustom.methods.lora_layers import LoRALinear
from minicustom.quant import nf4
from minicustom.quant.linear4bit import FUSED_MAX_ROWS, memory_report, quantize_model
from minicustom.train.dpo import BaseReference, DPOConfig, DPOLoss, SnapshotReference, pair_batch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATES = HERE / "templates"
PAGES = ("lora", "qlora", "sft_dpo_rlhf")
NUMBERS = "numbers.json"

# The data every page uses: a format to learn (answer in capitals) and pairs to prefer (the right city).
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Canada", "Ottawa")]
WRONG = {"France": "Lyon", "Japan": "Osaka", "Peru": "Cusco", "Norway": "Bergen"}
PROBE_COUNTRY = "Italy"  # held out: not among the records
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def question(country: str) -> str:
    return f"Q: What is the capital of {country}?\nA:"


PROBE = question(PROBE_COUNTRY)


def sft_records() -> list[dict]:
    return [{"prompt": question(c), "completion": f" {city.upper()}"} for c, city in CAPITALS]


def preference_records() -> list[dict]:
    return [{"prompt": question(c), "chosen": f" {city}.", "rejected": f" {WRONG[c]}."}
            for c, city in CAPITALS if c in WRONG]


# -- formatting ---------------------------------------------------------------------------------------------

def sci(x) -> str:
    """A difference: 0.0 when exact, else two significant digits."""
    x = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    return "0.0" if x == 0 else f"{x:.1e}"


def num(x, digits: int = 4) -> str:
    x = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    return f"{x:.{digits}f}"


def count(n) -> str:
    return f"{int(n):,}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def shape(t) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def token_text(tok, i: int) -> str:
    """A token as a table cell shows it: its text, whitespace made visible, no | or backtick."""
    text = tok.decode([i]).replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
    return f"`{text}`" if text.strip() else f"`{text.replace(' ', '␣')}`"


# -- the smoke model ------------------------------------------------------------------------------------------

def tiny_checkpoint(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 64, tied embeddings) and a byte-level BPE tokenizer, as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = [r["prompt"] + r["completion"] for r in sft_records()] + [PROBE + " Rome"]
    text += [r["prompt"] + r["chosen"] + r["rejected"] for r in preference_records()]
    bpe.train_from_iterator(text * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    config = mc.ModelConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = mc.Transformer(config)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.02)
    mc.save_model(model, folder)
    return folder


# -- page 1: LoRA ---------------------------------------------------------------------------------------------

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def lora_shapes(model, r: int) -> tuple[str, int]:
    """The table of layer 0's projections with their LoRA factors, and the LoRA parameters of one layer."""
    rows, per_layer = [], 0
    for name in PROJECTIONS:
        W = model.get_submodule(f"model.layers.0.{name}").weight
        out, in_ = W.shape
        per_layer += r * (in_ + out)
        rows.append([f"`{name}`", shape(W), f"({r}, {in_})", f"({out}, {r})", count(r * (in_ + out)),
                     count(out * in_), f"{100 * r * (in_ + out) / (out * in_):.2f}%"])
    head = ["module", "W0 (out, in)", "A (r, in)", "B (out, r)", "r (in + out)", "out x in", "ratio"]
    return table(head, rows), per_layer


def check_lora_backward(layer) -> dict:
    """LoRALinear's forward and its custom backward (_LoRAProduct) against the plain expression, by autograd."""
    torch.manual_seed(1)
    A, B = (p.detach().clone().requires_grad_(True) for p in layer.factors("default"))
    s = layer.scaling["default"]
    x = torch.randn(2, 7, layer.in_features, requires_grad=True)
    g = torch.randn(2, 7, layer.out_features)
    y = layer(x)
    grads = torch.autograd.grad((y * g).sum(), (x, *layer.factors("default")))
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x2, layer.weight) + s * (x2 @ A.T) @ B.T  # (2, 7, out)
    ref = torch.autograd.grad((y_ref * g).sum(), (x2, A, B))
    return {"lora_bwd_y": sci((y - y_ref).abs().max()), "lora_bwd_x": sci((grads[0] - ref[0]).abs().max()),
            "lora_bwd_A": sci((grads[1] - ref[1]).abs().max()), "lora_bwd_B": sci((grads[2] - ref[2]).abs().max()),
            "lora_bwd_gmax": num(max(t.abs().max() for t in ref), 2), "lora_bwd_rows": " x ".join(map(str, x.shape[:-1]))}


def train_lora(model, tok, steps: int, lr: float) -> list[float]:
    """A few full-batch LoRA SFT steps on the capitals records (answers in capitals); the loss per step."""
    batch = collate([[make_example(r, tok)] for r in sft_records()], pad_id_for(tok))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        h = model.forward_hidden(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, C)
        total, n = sft_loss(h, batch["labels"], model.head())
        (total / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(total.item() / n)
    return losses


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 4) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n, temperature=0.0)
    return tok.decode(out[0, ids.shape[1]:]).replace("\n", "\\n")


def adapter_files(folder: Path) -> dict:
    """What save_adapter wrote: the config, the keys of layer 0 with their shapes, the metadata."""
    from safetensors import safe_open

    file = folder / peft_format.WEIGHTS_FILE
    with safe_open(str(file), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        rows = [[f"`{k}`", "(" + ", ".join(map(str, f.get_slice(k).get_shape())) + ")"]
                for k in sorted(keys) if ".layers.0." in k]
    config = json.loads((folder / peft_format.CONFIG_FILE).read_text())
    return {"lora_config_json": json.dumps(config, indent=2), "lora_n_keys": count(len(keys)),
            "lora_file_bytes": count(file.stat().st_size), "lora_layer0_keys": table(["key", "shape"], rows),
            "lora_first_key": f"`{sorted(keys)[0]}`",
            "lora_meta": ", ".join(f"`{k}`" for k in sorted(meta)),
            "lora_config_fields": count(len(config))}


def page_lora(path: Path, figures: Path, smoke: bool) -> dict:
    torch.manual_seed(0)
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    r, alpha = 8, 16.0
    cfg = model.config
    probe = torch.tensor([tok.encode(PROBE)])
    with torch.no_grad():
        base_logits = model(probe)
    shapes, per_layer = lora_shapes(model, r)
    n: dict = {"lora_shapes": shapes, "lora_per_layer": count(per_layer), "lora_layers": str(cfg.num_hidden_layers),
               "lora_r": str(r), "lora_alpha": num(alpha, 1), "lora_s": num(alpha / r, 1),
               "lora_hidden": str(cfg.hidden_size), "lora_inter": str(cfg.intermediate_size)}
    before = greedy(model, tok, PROBE)
    mc.apply_lora(model, r=r, alpha=alpha, targets="all-linear", verbose=False)
    trainable, total = mc.count_parameters(model)
    n_modules = sum(1 for _, m in model.named_modules() if isinstance(m, LoRALinear))
    n.update(lora_modules=str(n_modules), lora_trainable=count(trainable), lora_total=count(total),
             lora_percent=f"{100 * trainable / total:.3f}%", lora_check=count(per_layer * cfg.num_hidden_layers))
    q = model.model.layers[0].self_attn.q_proj
    A, B = q.factors("default")
    with torch.no_grad():
        init_diff = (model(probe) - base_logits).abs().max()
    n.update(lora_bound=num(1 / math.sqrt(q.in_features), 6), lora_in=str(q.in_features),
             lora_A_max=num(A.abs().max(), 6), lora_A_min=num(A.min(), 6), lora_B_max=sci(B.abs().max()),
             lora_init_diff=sci(init_diff), lora_base_max=num(base_logits.abs().max(), 2))

    steps, lr = (6 if smoke else 15), 2e-3
    losses = train_lora(model, tok, steps, lr)
    draw_loss(figures / "lora_loss.png", losses)
    n.update(lora_steps=str(steps), lora_lr=f"{lr:g}", lora_loss_first=num(losses[0]), lora_loss_last=num(losses[-1]),
             lora_before=f"`{before}`", lora_after=f"`{greedy(model, tok, PROBE)}`",
             lora_B_after=num(B.abs().max(), 6), lora_records=str(len(CAPITALS)),
             lora_probe="`" + PROBE.replace("\n", "\\n") + "`")
    n.update(check_lora_backward(q))

    # merging: W0 <- W0 + s B A in place, and back
    with torch.no_grad():
        with mc.disable_adapters(model):  # the frozen base after training: still the base, bit for bit
            n["lora_disabled_diff"] = sci((model(probe) - base_logits).abs().max())
        W0 = q.weight.detach().clone()
        unmerged = model(probe)
        mc.merge_adapters(model)
        merged = model(probe)
        dW = (q.weight - W0 - q.delta("default")).abs().max()
        mc.unmerge_adapters(model)
        restored = (q.weight - W0).abs().max()
        again = model(probe)
        with mc.disable_adapters(model):
            base_again = (model(probe) - base_logits).abs().max()  # W0 back to within rounding, not bit for bit
    n.update(lora_merge_diff=sci((merged - unmerged).abs().max()), lora_logit_max=num(unmerged.abs().max(), 2),
             lora_merge_dW=sci(dW), lora_unmerge_W=sci(restored), lora_unmerge_logits=sci((again - unmerged).abs().max()),
             lora_W0_max=num(W0.abs().max(), 4), lora_unmerged_base_diff=sci(base_again))

    with tempfile.TemporaryDirectory() as tmp:
        mc.save_adapter(model, Path(tmp) / "adapter")
        n.update(adapter_files(Path(tmp) / "adapter"))
        fresh = mc.load_adapter(mc.load_model(path), Path(tmp) / "adapter")
        with torch.no_grad():
            n["lora_reload_diff"] = sci((fresh(probe) - unmerged).abs().max())
    plain = mc.merge_adapter(model)
    n["lora_unloaded"] = f"`{type(plain.model.layers[0].self_attn.q_proj).__name__}`"
    return n


# -- page 2: QLoRA --------------------------------------------------------------------------------------------

def nf4_levels_table() -> tuple[str, str]:
    derived = nf4.derive_nf4()
    rows = [[i, f"`{i:04b}`", f"{nf4.NF4[i].item():+.7f}", f"{derived[i].item():+.7f}"] for i in range(16)]
    return (table(["index", "4-bit code", "NF4 (bitsandbytes' fp32)", "derive_nf4() (fp64)"], rows),
            sci((derived.float() - nf4.NF4).abs().max()))


def block_walk(W: torch.Tensor) -> dict:
    """Block 0 of W (its first 64 values, row-major) quantized by hand, checked against nf4.quantize."""
    block = W.reshape(-1)[:64].float()
    absmax = block.abs().max()
    inv = 1.0 / absmax  # the reference multiplies by the reciprocal (full blocks), as bitsandbytes
    x = torch.clamp(block * inv, -1, 1)
    mid = (nf4.NF4[:-1] + nf4.NF4[1:]) / 2  # 15 decision boundaries
    codes = torch.bucketize(x, mid)  # nearest level; on a midpoint, the lower one
    packed = (codes[0::2] << 4) | codes[1::2]  # 32 bytes, the first value in the high nibble
    state = nf4.quantize(W, 64, double_quant=True)
    assert torch.equal(packed.to(torch.uint8), state.packed.reshape(-1)[:32]), "the hand-made bytes differ"
    plain = nf4.dequantize(nf4.quantize(W, 64, double_quant=False)).reshape(-1)[:64]
    dq = nf4.NF4[codes] * absmax
    assert torch.equal(dq, plain), "code * absmax differs from nf4.dequantize"
    gaps = (nf4.NF4[1:] - nf4.NF4[:-1]).max()
    rows = [[i, f"{block[i].item():+.6f}", f"{x[i].item():+.6f}", f"{nf4.NF4[codes[i]].item():+.6f}",
             f"{codes[i].item()} = `{codes[i].item():04b}`", f"{dq[i].item():+.6f}", sci((dq[i] - block[i]).abs())]
            for i in range(16)]
    grid = "\n".join(" ".join(f"{c:X}" for c in codes[k:k + 16].tolist()) for k in range(0, 64, 16))
    bytes_ = "\n".join(" ".join(f"{b:02X}" for b in packed[k:k + 8].tolist()) for k in range(0, 32, 8))
    i_max = int(block.abs().argmax())
    counts = torch.bincount(codes, minlength=16)
    return {"q_block_table": table(["i", "w_i", "x_i = w_i / absmax", "nearest level", "code", "code x absmax",
                                    "abs error"], rows),
            "q_absmax": f"{absmax.item():.7f}", "q_inv": f"{inv.item():.5f}", "q_imax": str(i_max),
            "q_wmax": f"{block[i_max].item():+.7f}", "q_codes_grid": grid, "q_bytes": bytes_,
            "q_byte0": f"{packed[0].item():02X}", "q_c0": f"{codes[0].item():X}", "q_c1": f"{codes[1].item():X}",
            "q_block_err": sci((dq - block).abs().max()), "q_gap": num(gaps, 6),
            "q_err_bound": f"{(gaps / 2 * absmax).item():.6f}", "q_used_levels": str(int((counts > 0).sum())),
            "q_distinct": str(block.unique().numel()), "q_x": x, "q_codes": codes}


def double_quant_walk(W: torch.Tensor) -> dict:
    """The fp32 block scales of W quantized to 8 bits in blocks of 256 (the offset subtracted first)."""
    scales = nf4.quantize(W, 64, double_quant=False).absmax  # (blocks,) fp32
    state = nf4.quantize(W, 64, double_quant=True)
    offset = scales.mean()
    centered = scales - offset
    nested_max = centered[:256].abs().max()
    scaled = torch.clamp(centered[:256] * (1.0 / nested_max), -1, 1)
    grid = (((scaled + 1) * 0.5) * 65535 + 0.5).to(torch.int64)  # bitsandbytes' 65536-point grid
    dyn = nf4.dynamic_map()
    codes = state.absmax[:256].long()
    rebuilt = state.block_absmax()
    assert torch.equal(nested_max, state.nested_absmax[0]) and torch.equal(offset, state.offset)
    assert torch.equal(rebuilt, nf4.dequantize_blockwise(state.absmax, state.nested_absmax, dyn, 256) + offset)
    rows = [[b, f"{scales[b].item():.7f}", f"{centered[b].item():+.7f}", f"{scaled[b].item():+.6f}", grid[b].item(),
             codes[b].item(), f"{dyn[codes[b]].item():+.6f}", f"{rebuilt[b].item():.7f}",
             sci(((rebuilt[b] - scales[b]) / scales[b]).abs())] for b in range(4)]
    rel = ((rebuilt - scales) / scales).abs()
    full = nf4.dequantize(state)
    return {"q_dq_table": table(["block b", "absmax_b", "- offset", "/ nested absmax", "grid point", "8-bit code",
                                 "dynamic[code]", "rebuilt absmax_b", "rel. error"], rows),
            "q_blocks": count(scales.numel()), "q_nested_blocks": str(state.nested_absmax.numel()),
            "q_offset": f"{offset.item():.7f}", "q_nested_max": f"{nested_max.item():.7f}",
            "q_dq_rel_max": sci(rel.max()), "q_dq_rel_mean": sci(rel.mean()),
            "q_dq_worst_absmax": f"{scales[rel.argmax()].item():.4f}", "q_absmax_median": f"{scales.median().item():.4f}",
            "q_dyn_n": str(dyn.numel()), "q_weight_err_max": sci((full - W).abs().max()),
            "q_weight_err_mean": sci((full - W).abs().mean()), "q_weight_abs_mean": sci(W.abs().mean()),
            "state": state}


def memory_walk(state: nf4.QuantState) -> dict:
    n = state.numel
    parts = [("packed codes (uint8, 2 per byte)", state.packed), ("absmax codes (uint8, 1 per block)", state.absmax),
             ("nested absmax (fp32, 1 per 256 blocks)", state.nested_absmax), ("offset (fp32, 1 per tensor)", state.offset)]
    rows = [[what, count(t.numel()), count(t.numel() * t.element_size()), f"{8 * t.numel() * t.element_size() / n:.6f}"]
            for what, t in parts]
    rows.append(["**total**", "", count(state.nbytes()), f"**{state.bits_per_param():.6f}**"])
    formula = 4 + 8 / 64 + 32 / (64 * 256)
    return {"q_mem_table": table(["stored tensor", "values", "bytes", "bits per weight"], rows),
            "q_formula": f"{formula:.6f}", "q_formula3": f"{formula:.3f}", "q_bits_measured": f"{state.bits_per_param():.6f}",
            "q_numel": count(n), "q_fp32_bytes": count(4 * n), "q_bf16_bytes": count(2 * n),
            "q_ratio_bf16": f"{16 / state.bits_per_param():.2f}"}


def kernel_check(state: nf4.QuantState) -> dict:
    """The Triton kernel on the CPU interpreter (TRITON_INTERPRET=1) against the reference, in fp32 and bf16."""
    try:
        from minicustom.kernels import nf4_dequant
    except ImportError as e:
        return {"q_kernel_fp32": f"not run ({e})", "q_kernel_bf16": f"not run ({e})"}
    out = {}
    for dtype, bits, key in ((torch.float32, torch.int32, "q_kernel_fp32"), (torch.bfloat16, torch.int16, "q_kernel_bf16")):
        ours, ref = nf4_dequant.dequantize(state, dtype), nf4.dequantize(state, dtype)
        differ = (ours.view(bits) != ref.view(bits)).sum()  # compared bit for bit
        out[key] = f"{count(differ)} of {count(ref.numel())}"
    return out


def page_qlora(path: Path, figures: Path, smoke: bool) -> dict:
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    W = model.model.layers[0].self_attn.q_proj.weight.detach()
    levels, derive_diff = nf4_levels_table()
    n: dict = {"q_levels": levels, "q_derive_diff": derive_diff, "q_shape": shape(W)}
    walk = block_walk(W)
    draw_nf4(figures / "nf4_block.png", walk.pop("q_x"), walk.pop("q_codes"))
    n.update(walk)
    dq = double_quant_walk(W)
    state = dq.pop("state")
    n.update(dq)
    n.update(memory_walk(state))
    n.update(kernel_check(state))

    probe = torch.tensor([tok.encode(PROBE + " Rome. Q: What is the capital of Spain?\nA:")])
    with torch.no_grad():
        full = model(probe)
        quantize_model(model)
        four = model(probe)
    report = memory_report(model)
    m = re.search(r"([\d,]+) parameters at ([\d.]+) bits each \(([\d.]+) MiB\); other weights ([\d.]+) MiB", report)
    n.update(q_model_params=m[1], q_model_bits=m[2], q_model_mib=m[3], q_other_mib=m[4],
             q_fp32_mib=f"{int(m[1].replace(',', '')) * 4 / 2**20:.1f}",
             q_logits_diff=num((four - full).abs().max(), 3), q_logits_max=num(full.abs().max(), 2),
             q_top1=f"{int((four.argmax(-1) == full.argmax(-1)).sum())} of {probe.shape[1]}",
             q_probe_tokens=str(probe.shape[1]), q_fused_rows=str(FUSED_MAX_ROWS))
    return n


# -- page 3: SFT, DPO, RLHF -----------------------------------------------------------------------------------

def mask_walk(tok) -> dict:
    record = sft_records()[0]
    ex = make_example(record, tok)
    rows = []
    for t, (i, y) in enumerate(zip(ex.input_ids, ex.labels)):
        target = "" if t + 1 >= len(ex.labels) or ex.labels[t + 1] == IGNORE else token_text(tok, ex.labels[t + 1])
        rows.append([t, token_text(tok, i), i, "-100" if y == IGNORE else y, target])
    chat = make_example(record, tok, chat=True)
    trained = [i for i, y in zip(chat.input_ids, chat.labels) if y != IGNORE]
    return {"d_record": json.dumps(record), "d_mask_table": table(
                ["t", "token", "input_ids[t]", "labels[t]", "position t is trained to predict"], rows),
            "d_n_tokens": str(len(ex)), "d_n_trained": str(ex.trained),
            "d_chat_tokens": str(len(chat)), "d_chat_trained": str(chat.trained),
            "d_chat_trained_text": f"`{tok.decode(trained).replace(chr(10), chr(92) + 'n')}`"}


def logp_walk(model, tok) -> dict:
    """sequence_logps of the first pair's chosen row, against log_softmax written out."""
    pair = make_pair(preference_records()[0], tok)
    batch = pair_batch([pair], pad_id_for(tok))  # rows: chosen, rejected
    with torch.no_grad():
        h = model.forward_hidden(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (2, T, C)
        logps, lengths = sequence_logps(h, batch["labels"], model.head())
        logp_all = torch.log_softmax(model.head()(h).float(), dim=-1)  # (2, T, V)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    rows, total = [], 0.0
    for t in range(len(ids) - 1):
        if labels[t + 1] != IGNORE:
            lp = logp_all[0, t, labels[t + 1]].item()
            total += lp
            rows.append([t, token_text(tok, int(labels[t + 1])), f"{lp:.4f}"])
    manual = torch.stack([sum(logp_all[b, t, batch["labels"][b, t + 1]] for t in range(batch["labels"].shape[1] - 1)
                                  if batch["labels"][b, t + 1] != IGNORE) for b in range(2)])
    return {"d_logp_table": table(["t", "target labels[t+1]", "log p(target \\| tokens ≤ t)"], rows),
            "d_logp_chosen": f"{logps[0].item():.4f}", "d_logp_rejected": f"{logps[1].item():.4f}",
            "d_len_chosen": str(int(lengths[0])), "d_len_rejected": str(int(lengths[1])),
            "d_logp_manual": f"{total:.4f}", "d_logp_diff": sci((logps - manual).abs().max()),
            "d_pair": json.dumps(preference_records()[0])}


def dpo_gradient(beta: float) -> dict:
    """dL/d(log-probs) of the DPO loss: closed form, autograd of preference_loss, central differences."""
    x = torch.tensor([-9.0, -11.5, -10.0, -10.8])  # log π(y_w), log π(y_l), log π_ref(y_w), log π_ref(y_l)
    leaves = x.clone().requires_grad_(True)
    loss = preference_loss(*leaves.split(1), beta=beta).losses.sum()
    (auto,) = torch.autograd.grad(loss, leaves)
    h = (x[0] - x[2]) - (x[1] - x[3])
    g = beta * torch.sigmoid(-beta * h)  # β σ(−βh)
    closed = torch.stack([-g, g, g, -g])
    delta, fd = 1e-2, []  # the central difference's step
    for k in range(4):
        up, down = x.clone(), x.clone()
        up[k] += delta
        down[k] -= delta
        f = [preference_loss(*v.split(1), beta=beta).losses.sum().item() for v in (up, down)]
        fd.append((f[0] - f[1]) / (2 * delta))
    fd = torch.tensor(fd)
    names = ["log π(y_w)", "log π(y_l)", "log π_ref(y_w)", "log π_ref(y_l)"]
    rows = [[names[k], f"{x[k].item():.1f}", f"{closed[k].item():+.7f}", f"{auto[k].item():+.7f}",
             f"{fd[k].item():+.7f}"] for k in range(4)]
    return {"d_grad_table": table(["input", "value", "closed form ±β σ(−βh)", "autograd", "central difference"], rows),
            "d_grad_h": f"{h.item():.1f}", "d_grad_loss": f"{loss.item():.6f}",
            "d_grad_by_hand": f"{-F.logsigmoid(beta * h).item():.6f}",
            "d_grad_auto_diff": sci((auto - closed).abs().max()), "d_grad_fd_diff": sci((fd - closed).abs().max()),
            "d_grad_step": f"{delta:g}"}


def dpo_steps(model, tok, steps: int, beta: float) -> dict:
    """LoRA DPO steps through the trainer's own loss module, the reference being the adapters switched off."""
    pairs = [make_pair(r, tok) for r in preference_records()]
    batch = pair_batch(pairs, pad_id_for(tok))
    batch["pair_mask"] = torch.ones(len(pairs), dtype=torch.long)
    with torch.no_grad():
        base = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    r = 8
    mc.apply_lora(model, r=r, alpha=16.0, verbose=False)
    config = DPOConfig(beta=beta)
    snapshot = SnapshotReference(model)
    loss_fn = DPOLoss(model, BaseReference(model), config)
    lr = 1e-3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rows = []
    with torch.no_grad():
        ref_base = BaseReference(model)(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 512)
        ref_snap = snapshot(model, batch["input_ids"], batch["labels"], batch.get("attention_mask"), 512)
    for step in range(steps):
        total, stats = loss_fn(**batch)
        (total / len(pairs)).backward()
        opt.step()
        opt.zero_grad()
        B = len(pairs)
        rows.append([step, f"{total.item() / B:.6f}", f"{stats['rewards/chosen'].item() / B:+.5f}",
                     f"{stats['rewards/rejected'].item() / B:+.5f}", f"{stats['rewards/accuracies'].item() / B:.2f}"])
    with torch.no_grad():
        with mc.disable_adapters(model):
            off = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return {"d_step_table": table(["step", "loss (mean over pairs)", "β c (chosen reward)", "β r (rejected reward)",
                                   "accuracy"], rows),
            "d_ln2": f"{math.log(2):.6f}", "d_pairs": str(len(pairs)), "d_steps": str(steps), "d_lr": f"{lr:g}", "d_r": str(r),
            "d_ref_snap_diff": sci((ref_base - ref_snap).abs().max()), "d_off_diff": sci((off - base).abs().max())}


def page_dpo(path: Path, figures: Path, smoke: bool) -> dict:
    torch.manual_seed(0)
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    beta = 0.1
    n: dict = {"d_beta": str(beta)}
    n.update(mask_walk(tok))
    n.update(logp_walk(model, tok))
    n.update(dpo_gradient(beta))
    n.update(dpo_steps(model, tok, 3 if smoke else 4, beta))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])  # one prompt's group of completions, scored 1 or 0
    adv = group_advantages(rewards, len(rewards))
    chosen, rejected = torch.tensor([1.2]), torch.tensor([0.3])  # a reward model's two scores
    n.update(d_adv=", ".join(f"{a:+.4f}" for a in adv.tolist()), d_rewards=", ".join(f"{x:g}" for x in rewards.tolist()),
             d_group=str(len(rewards)), d_rm_chosen=f"{chosen.item():g}", d_rm_rejected=f"{rejected.item():g}",
             d_rm_diff=f"{(chosen - rejected).item():g}", d_rm_loss=f"{reward_loss(chosen, rejected).item():.6f}",
             d_rm_check=f"{-F.logsigmoid(chosen - rejected).item():.6f}")
    return n


# -- figures ---------------------------------------------------------------------------------------------------

def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def draw_nf4(file: Path, x: torch.Tensor, codes: torch.Tensor):
    """The block's 64 scaled values against the 16 NF4 levels, each joined to the level it is stored as."""
    fig = _figure((8.0, 4.8))
    ax = fig.add_subplot()
    for v in nf4.NF4.tolist():
        ax.axhline(v, color="0.8", lw=0.8, zorder=0)
    i = torch.arange(len(x))
    ax.vlines(i, x, nf4.NF4[codes], color="C3", lw=1)
    ax.scatter(i, nf4.NF4[codes], s=14, marker="_", color="C3", label="stored: code[q_i]")
    ax.scatter(i, x, s=12, color="C0", label="x_i = w_i / absmax", zorder=3)
    ax.set(xlabel="i (position in the block)", ylabel="value / absmax", title="one block of 64 weights and the 16 NF4 levels")
    ax.set_yticks(nf4.NF4.tolist(), [f"{v:+.2f}" for v in nf4.NF4.tolist()], fontsize=7)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(file, format="png", dpi=100)


def draw_loss(file: Path, losses: list[float]):
    fig = _figure((6.0, 3.2))
    ax = fig.add_subplot()
    ax.plot(range(len(losses)), losses, marker="o", ms=3)
    ax.set(xlabel="step", ylabel="loss (mean over trained tokens)", title="LoRA SFT, r = 8, all linears")
    ax.grid(alpha=0.3)
    fig.savefig(file, format="png", dpi=100)


# -- rendering -------------------------------------------------------------------------------------------------

_TREES: dict[Path, ast.Module] = {}


def find_def(path: str, name: str) -> tuple[int, int]:
    """(first line, last line) of def/class/assignment `name` ("Class.method" for nested) in the file."""
    file = ROOT / path
    if file not in _TREES:
        _TREES[file] = ast.parse(file.read_text(), str(file))
    body = _TREES[file].body
    node = None
    for part in name.split("."):
        node = next((n for n in body if _defines(n, part)), None)
        if node is None:
            raise KeyError(f"{path}: no def, class or assignment named {name!r}")
        body = getattr(node, "body", [])
    return node.lineno, node.end_lineno


def _defines(node, name: str) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Name) and t.id == name for t in targets)
    return False


def _find_line(path: str, name: str, text: str) -> int:
    start, end = find_def(path, name)
    lines = (ROOT / path).read_text().splitlines()
    for k in range(start, end + 1):
        if text in lines[k - 1]:
            return k
    raise KeyError(f"{path}: {name} has no line containing {text!r}")


def ref(path: str, name: str) -> str:
    return f"`{path}:{find_def(path, name)[0]}` (`{name}`)"


def quote(path: str, name: str, text: str, n: str = "1") -> str:
    first = _find_line(path, name, text)
    last = first + int(n) - 1
    if last > find_def(path, name)[1]:
        raise KeyError(f"{path}: {n} lines from line {first} run past the end of {name}")
    lines = (ROOT / path).read_text().splitlines()[first - 1:last]
    where = f"{first}" if first == last else f"{first}-{last}"
    return f"`{path}:{where}` (in `{name}`):\n\n```python\n{textwrap.dedent(chr(10).join(lines))}\n```"


def line(path: str, name: str, text: str) -> str:
    k = _find_line(path, name, text)
    code = (ROOT / path).read_text().splitlines()[k - 1].strip()
    if "|" in code or "`" in code:
        raise ValueError(f"{path}:{k} holds | or a backtick, which a table cell cannot show: quote it instead")
    return f"`{path}:{k}` (in `{name}`): `{code}`"


def render(template: str, numbers: dict) -> str:
    def sub(m):
        kind, *args = shlex.split(m[1])
        if kind in ("ref", "quote", "line"):
            return {"ref": ref, "quote": quote, "line": line}[kind](*args)
        if kind not in numbers or args:
            raise KeyError(f"placeholder {{{{{m[1]}}}}}: no such number (a new one? run make_figures.py without --render)")
        return numbers[kind]
    return re.sub(r"\{\{(.+?)\}\}", sub, template)


def render_pages(numbers: dict, out: Path):
    for page in PAGES:
        text = render((TEMPLATES / f"{page}.md.in").read_text(), numbers)
        (out / f"{page}.md").write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny random model in a temporary folder (also MINICUSTOM_SMOKE=1)")
    p.add_argument("--render", action="store_true", help="only render the pages again from OUT/figures/numbers.json")
    p.add_argument("--out", type=Path, help="output folder (default: docs/walkthroughs, or a new temp folder in smoke mode)")
    args = p.parse_args(argv)
    smoke = args.smoke or os.environ.get("MINICUSTOM_SMOKE") == "1"
    out = args.out or (Path(tempfile.mkdtemp(prefix="walkthroughs-")) if smoke else HERE)
    figures = out / "figures"
    if args.render:
        render_pages(json.loads((figures / NUMBERS).read_text()), out)
        print(f"rendered {', '.join(PAGES)} into {out}")
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is first imported: the kernel check on CPU
    figures.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one thread: numbers that do not depend on the core count, and no stalls when busy
    start = time.perf_counter()
    tmp = None
    if smoke:
        tmp = Path(tempfile.mkdtemp(prefix="walkthrough-model-"))
        path = tiny_checkpoint(tmp)
    else:
        path = demo_model()
    try:
        cfg = mc.load_model(path).config
        label = ("a tiny random model (2 layers, hidden 64, BPE vocabulary of 300: MINICUSTOM_SMOKE)" if smoke else
                 f"SmolLM2-135M-Instruct ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size})")
        numbers = {"model": label, "torch": torch.__version__}
        for page, compute in (("lora", page_lora), ("qlora", page_qlora), ("sft_dpo_rlhf", page_dpo)):
            t = time.perf_counter()
            numbers.update(compute(path, figures, smoke))
            print(f"{page}: {time.perf_counter() - t:.0f} s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    (figures / NUMBERS).write_text(json.dumps(numbers, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    render_pages(numbers, out)
    print(f"wrote {', '.join(PAGES)} and figures/ into {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
