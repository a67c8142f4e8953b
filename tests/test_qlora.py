"""QLoRA: Linear4bit autograd, LoRA/DoRA on a 4-bit base, bitsandbytes checkpoints both ways, LoftQ, merging."""

import copy
import json

import pytest
import torch
from conftest import make_checkpoint
from nf4_oracle import fp32_transformers_model
from torch import nn

from minicustom.checkpoint import load_model, save_model
from minicustom.methods import lora_layers as lora
from minicustom.methods import qlora
from minicustom.methods.lora import apply_lora
from minicustom.quant import linear4bit, nf4


def pair(seed=0, out=33, inp=70, bias=True):
    """A Linear4bit and an nn.Linear holding its dequantized weight."""
    torch.manual_seed(seed)
    q = linear4bit.Linear4bit.from_linear(nn.Linear(inp, out, bias=bias))
    ref = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        if bias:
            ref.bias.copy_(q.bias)
    ref.requires_grad_(False)
    return q, ref


def test_linear4bit_forward_and_input_grad_equal_the_dequantized_linear():
    q, ref = pair()
    x = torch.randn(3, 5, 70, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = q(x), ref(x2)
    # F.linear(x, W) + b vs one addmm: the same products, the bias added before or after rounding
    torch.testing.assert_close(y, y2, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)  # g @ W either way
    assert q.bias.grad is None  # frozen


def test_backward_saves_only_the_packed_weight():
    q, _ = pair(out=128, inp=256, bias=False)
    saved = []

    def pack_hook(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "nothing saved: the hook did not run"
    # floating-point tensors: at most one scale per block of 64 (no copy of the weight, no input)
    floats = [t for t in saved if t.is_floating_point()]
    assert all(t.numel() <= 128 * 256 // 64 for t in floats), [(t.dtype, tuple(t.shape)) for t in saved]
    assert any(t.data_ptr() == q.state.packed.data_ptr() for t in saved)
    assert sum(t.numel() * t.element_size() for t in saved) == q.state.nbytes()


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_equals_lora_on_the_dequantized_weight(use_dora):
    q, ref = pair(seed=1)
    torch.manual_seed(5)
    a = lora.LoRALinear(q)
    b = lora.LoRALinear(ref)
    config = lora.LoraConfig(r=4, alpha=8, use_dora=use_dora)
    a.add("default", 4, 8, config)
    b.add("default", 4, 8, config)
    with torch.no_grad():
        for m in (a, b):
            m.lora_B["default"].weight.normal_(generator=torch.Generator().manual_seed(2))
            m.lora_A["default"].weight.normal_(generator=torch.Generator().manual_seed(3))
        if use_dora:
            b.lora_magnitude_vector["default"].copy_(a.lora_magnitude_vector["default"])
    a.active = b.active = ["default"]
    x = torch.randn(2, 7, 70, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ya, yb = a(x), b(x2)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    pb = dict(b.named_parameters())
    trained = [(n, p) for n, p in a.named_parameters() if p.requires_grad]
    assert len(trained) == 3 if use_dora else 2
    for name, p in trained:
        torch.testing.assert_close(p.grad, pb[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def hf_4bit(path, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)


@pytest.mark.parametrize("family, quant_type, double_quant", [
    ("llama-bias", "nf4", True), ("qwen3", "nf4", True), ("smollm", "fp4", False)])
def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path, family, quant_type, double_quant):
    """transformers+bitsandbytes quantize and save (bitsandbytes' bytes are the same on every CPU); the oracle
    for the logits is an fp32 transformers model holding those bytes decoded by the formula, not bitsandbytes'
    4-bit forward, which is wrong on AVX-512 CPUs (tests/nf4_oracle.py)."""
    make_checkpoint(tmp_path / "fp", family)
    hf_4bit(tmp_path / "fp", quant_type, double_quant).save_pretrained(tmp_path / "q")
    model = load_model(tmp_path / "q")
    assert sum(isinstance(m, linear4bit.Linear4bit) for m in model.modules()) == 7 * model.config.num_hidden_layers
    assert {m.state.quant_type for m in model.modules() if isinstance(m, linear4bit.Linear4bit)} == {quant_type}
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), fp32_transformers_model(tmp_path / "q")(ids).logits,
                                   rtol=0, atol=1e-5)


def test_minicustom_quantized_checkpoint_loads_in_transformers(tmp_path):
    """transformers+bitsandbytes read our 4-bit folder into the same bytes and scales we wrote; the logits are
    checked against an fp32 transformers model of the decoded bytes (see the test above for why)."""
    make_checkpoint(tmp_path / "fp", "llama-bias")
    model = load_model(tmp_path / "fp", quantize="nf4")
    save_model(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu", dtype=torch.float32)
    ours = {n: m.state for n, m in model.named_modules() if isinstance(m, linear4bit.Linear4bit)}
    theirs = {n: m.weight for n, m in hf.named_modules() if type(m).__name__ == "Linear4bit"}
    assert ours.keys() == theirs.keys() and len(ours) == 7 * model.config.num_hidden_layers
    for name, state in ours.items():
        w = theirs[name]
        assert torch.equal(w.data.view(torch.uint8).reshape(-1), state.packed.reshape(-1)), name
        assert torch.equal(w.quant_state.absmax, state.absmax), name
        assert torch.equal(w.quant_state.state2.absmax, state.nested_absmax), name
        assert w.quant_state.offset.item() == state.offset.item(), name
    again = load_model(tmp_path / "q")
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        out = model(ids)
        torch.testing.assert_close(fp32_transformers_model(tmp_path / "q")(ids).logits, out, rtol=0, atol=1e-5)
        assert torch.equal(again(ids), out)


def test_corrupt_quant_state_in_a_checkpoint_names_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path / "fp", "smollm")
    save_model(load_model(tmp_path / "fp", quantize="nf4"), tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.tensor(list(b'{"quant_type": "nf4"'), dtype=torch.uint8)
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(nf4.QuantError, match=r"model.safetensors: .*up_proj.*not valid JSON"):
        load_model(tmp_path / "q")
    tensors[key] = torch.tensor(list(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32",
                                                 "shape": [7, 9]}).encode()), dtype=torch.uint8)
    del tensors["model.layers.0.mlp.up_proj.weight.nested_absmax"]
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(nf4.QuantError, match="up_proj.weight holds"):
        load_model(tmp_path / "q")


def test_quantize_model_reports_bits_and_needs_targets():
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 512))
    linear4bit.quantize_model(model)
    assert "4.127 bits" in linear4bit.memory_report(model) or "4.128 bits" in linear4bit.memory_report(model)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        linear4bit.quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="4-bit"):
        apply_lora(model, r=2, init="pissa", verbose=False)


def test_loftq_beats_plain_quantization_and_applies_the_scaling():
    torch.manual_seed(0)
    W = torch.randn(96, 160) * 0.02 + torch.randn(96, 4) @ torch.randn(4, 160) * 0.05  # a low-rank part helps
    plain = (W - nf4.dequantize(nf4.quantize(W))).norm()
    errors = []
    for iters in (1, 2, 5):
        for s in (0.5, 2.0):
            state, A, B = qlora.loftq(W, r=8, scaling=s, iters=iters)
            errors.append((W - (nf4.dequantize(state) + s * B @ A)).norm())
            assert errors[-1] < 0.9 * plain, (iters, s)
    # the scaling only moves the factors: the same base and the same s·B·A for any s
    torch.testing.assert_close(errors[0], errors[1], rtol=1e-4, atol=0)
    assert errors[-1] <= errors[0] * 1.01  # more alternations do not hurt


def test_apply_loftq_starts_closer_to_the_full_precision_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    x = torch.randn(8, 64)
    plain = linear4bit.quantize_model(copy.deepcopy(base))
    model = qlora.apply_loftq(copy.deepcopy(base), r=8, alpha=16, iters=2, verbose=False)
    with torch.no_grad():
        target = base(x)
        assert (model(x) - target).norm() < (plain(x) - target).norm()
    assert all(isinstance(m.base_layer, linear4bit.Linear4bit) for m in model.modules()
               if isinstance(m, lora.LoRALinear))


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_into_4bit_base(use_dora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Linear(96, 64))
    linear4bit.quantize_model(model)
    apply_lora(model, r=4, use_dora=use_dora, verbose=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B["default"].weight.normal_(std=0.05)
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = model(x)
        merged = copy.deepcopy(model)
        report = qlora.merge_4bit(merged)
        assert report["layers"] == 2 and report["rel_error"] == 0
        assert all(type(m) is nn.Linear for m in (merged[0], merged[2]))
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)
        report = qlora.merge_4bit(model, requantize=True)
        assert isinstance(model[0], linear4bit.Linear4bit)
        assert 0.01 < report["rel_error"] < 0.2 and report["max_abs_error"] > 0  # NF4's error on W'
        assert (model(x) - before).abs().max() > 0
    with pytest.raises(ValueError, match="no LoRA adapter on a 4-bit base"):
        qlora.merge_4bit(model)


def sft(setup, out, *extra):
    from minicustom.cli import main

    root, path = setup
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--eval-data",
          str(root / "eval.jsonl"), "--out", str(out), "--max-length", "256", "--batch-size", "2",
          "--max-steps", "6", "--save-every", "3", "--eval-every", "3", "--exact-match", "0", "--lr", "3e-3",
          "--seed", "3", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_qlora_trains_resumes_and_merges(setup, tmp_path, capsys):
    import shutil

    from minicustom.cli import main
    from minicustom.methods import load_adapter

    root, path = setup
    straight = sft(setup, tmp_path / "a", "--method", "qlora")
    assert straight[-1]["eval_loss"] < 0.9 * straight[0]["eval_loss"]
    # roll back to the step-3 checkpoint, as if killed after it, and resume: the same curve
    sft(setup, tmp_path / "b", "--method", "qlora")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-000006")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("checkpoint-000003\n")
    resumed = sft(setup, tmp_path / "b", "--method", "qlora", "--resume")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight)
    # the adapter applies to the base quantized at load time; merging writes W' = dq(W4) + sBA
    model = load_model(path, quantize="nf4")
    load_adapter(model, tmp_path / "a")
    main(["merge", "--model", str(path), "--quantize", "nf4", "--adapter", str(tmp_path / "a"),
          "--out", str(tmp_path / "merged")])
    merged = load_model(tmp_path / "merged")
    assert not any(isinstance(m, linear4bit.Linear4bit) for m in merged.modules())
    ids = torch.randint(0, 400, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), rtol=1e-4, atol=1e-4)
    main(["merge", "--model", str(path), "--quantize", "nf4", "--adapter", str(tmp_path / "a"),
          "--out", str(tmp_path / "merged4"), "--requantize"])
    assert "relative error" in capsys.readouterr().err
    assert any(isinstance(m, linear4bit.Linear4bit) for m in load_model(tmp_path / "merged4").modules())


def test_cli_quantize(setup, tmp_path, capsys):
    from minicustom.cli import main

    _, path = setup
    main(["quantize", "--model", str(path), "--out", str(tmp_path / "q"), "--blocksize", "32"])
    assert "bits each" in capsys.readouterr().err
    model = load_model(tmp_path / "q")
    layers = [m for m in model.modules() if isinstance(m, linear4bit.Linear4bit)]
    assert layers and all(m.state.blocksize == 32 and m.state.double_quant for m in layers)
    assert (tmp_path / "q" / "tokenizer.json").exists()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(path), "--out", str(tmp_path / "bad"), "--blocksize", "48"])
    assert "argument --blocksize: invalid choice: 48" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit, match="is the input folder"):
        main(["quantize", "--model", str(path), "--out", str(path)])


def test_loftq_method_starts_closer_to_the_full_precision_model(setup):
    from minicustom.methods import apply_method

    _, path = setup
    ids = torch.randint(0, 400, (2, 11))
    with torch.no_grad():
        target = load_model(path)(ids)
        errors = {}
        for method in ("qlora", "qlora-loftq"):
            model = load_model(path)
            torch.manual_seed(0)
            apply_method(model, method, r=8)
            errors[method] = (model(ids) - target).norm()
    assert errors["qlora-loftq"] < errors["qlora"]


def test_to_dtype_sets_the_compute_dtype_and_keeps_the_codes():
    q, _ = pair()
    packed = q.state.packed
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16 and q.state.packed is packed
    assert q(torch.randn(2, 70)).dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), nf4.dequantize(q.state, torch.bfloat16))


def test_a_4bit_checkpoint_with_quantize_and_full_fine_tuning(setup, tmp_path):
    from minicustom.checkpoint import CheckpointError
    from minicustom.methods import apply_method

    _, path = setup
    save_model(load_model(path, quantize="nf4"), tmp_path / "q")
    assert any(isinstance(m, linear4bit.Linear4bit) for m in load_model(tmp_path / "q", quantize="nf4").modules())
    with pytest.raises(CheckpointError, match=r"already 4-bit \(nf4\); cannot quantize it to fp4"):
        load_model(tmp_path / "q", quantize="fp4")
    with pytest.raises(ValueError, match="4-bit and frozen"):
        apply_method(load_model(tmp_path / "q"), "full")
