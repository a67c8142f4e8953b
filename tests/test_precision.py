"""Mixed precision (precision.py): the custom autograd functions under autocast, the frozen base stored in
bf16 and put back, the trainer's bf16 run, fp16's gradient scaler, and the choice --precision auto makes.

Tolerances: the references are computed in float64 from the bf16-rounded inputs, so what is left is the
roundings inside the bf16 computation. Each rounding to bf16 (of an intermediate product such as x A^T,
or of an output) moves a value by at most U = 2^-8 of its magnitude, and fp32 accumulation adds about
k 2^-24, negligible here; propagated through the remaining products, each is bounded by U times the same
product taken over absolute values. Two roundings on any path, plus that slack: 3U x |a| |b|.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint
from test_train import model_and_examples

import minicustom as mc
from minicustom import precision
from minicustom.data import load_examples
from minicustom.losses import LinearCrossEntropy
from minicustom.methods import apply_method
from minicustom.methods.lora_layers import _LoRAProduct
from minicustom.quant.linear4bit import Linear4bit
from minicustom.train import TrainConfig, TrainingError, loop, train

U = 2.0**-8  # bf16's unit roundoff
BF16 = precision.Precision("bf16", "test")


def bf(t):
    """t as autocast hands it to a bf16 matmul, in float64 for the reference."""
    return t.detach().bfloat16().double()


def within(ours, ref, bound):
    err = (ours.double() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), f"max excess {float((err - bound).max()):.3g}"


def test_lora_product_under_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 70, generator=g, requires_grad=True)  # fp32: a norm's output in the fp32 residual
    A = torch.randn(4, 70, generator=g, requires_grad=True)  # fp32 master weights
    B = torch.randn(33, 4, generator=g, requires_grad=True)
    y = torch.randn(3, 5, 33, generator=g).bfloat16().requires_grad_()  # the bf16 base output
    s = 2.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _LoRAProduct.apply(y, x, A, B, s)
    assert out.dtype == torch.bfloat16
    X, Ab, Bb = bf(x).view(-1, 70), bf(A), bf(B)
    ref = bf(y).view(-1, 33) + s * (X @ Ab.T) @ Bb.T
    within(out.view(-1, 33), ref, 3 * U * (bf(y).view(-1, 33).abs() + s * (X.abs() @ Ab.abs().T) @ Bb.abs().T))

    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    G = grad.double().view(-1, 33)
    assert (y.grad.dtype, x.grad.dtype, A.grad.dtype, B.grad.dtype) == (torch.bfloat16,) + (torch.float32,) * 3
    assert torch.equal(y.grad, grad)
    within(x.grad.view(-1, 70), s * (G @ Bb) @ Ab, 3 * U * s * (G.abs() @ Bb.abs()) @ Ab.abs())
    within(A.grad, s * (G @ Bb).T @ X, 3 * U * s * (G.abs() @ Bb.abs()).T @ X.abs())
    within(B.grad, s * G.T @ (X @ Ab.T), 3 * U * s * G.abs().T @ (X.abs() @ Ab.abs().T))


def test_linear4bit_under_autocast():
    """The 4-bit base dequantizes straight to autocast's dtype: the same operands as a bf16 F.linear."""
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(70, 33, bias=False))
    x = torch.randn(4, 70, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    W = layer.dequantize(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x.detach().bfloat16(), W))
    g = torch.randn(4, 33).bfloat16()
    y.backward(g)
    assert x.grad.dtype == torch.float32 and torch.equal(x.grad, (g @ W).float())


def test_chunked_loss_under_autocast():
    """bf16 logits, fp32 log-softmax: each logit is rounded once (U |z|), so each row's loss moves by at most
    2U max|z| and its gradient by the rounding of dz and of the output plus the softmax's response."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 64, generator=g, requires_grad=True)
    W = torch.randn(300, 64, generator=g) * 0.2
    y = torch.randint(0, 300, (37,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LinearCrossEntropy.apply(h, W, y, 16)
    assert loss.dtype == torch.float32
    H, Wb = bf(h), bf(W)
    z = H @ Wb.T  # (N, V)
    zmax = (H.abs() @ Wb.abs().T).max(1).values  # (N,) bound on |z| per row
    ref = (torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0])
    assert abs(float(loss.detach()) - float(ref.sum())) <= float((2 * U * zmax).sum()) + 1e-4
    loss.backward()
    dz = z.softmax(1) - F.one_hot(y, 300).double()
    bound = (3 * U + 2 * U * zmax[:, None]) * (dz.abs() @ Wb.abs())
    assert h.grad.dtype == torch.float32
    within(h.grad, dz @ Wb, bound)


def test_dora_norm_is_fp32_under_autocast(setup):
    model, _, _ = model_and_examples(setup, "dora", r=4)
    layer = model.model.layers[0].self_attn.q_proj
    plain = layer._row_norm("default")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer._row_norm("default"), plain)


def test_store_frozen_moves_exact_matrices_and_rounds_linear_weights(setup):
    """bf16 numbers move exactly (their dtype kept to cast back); a random fp32 linear weight moves rounded,
    its original kept aside; trainable weights, vectors and the embedding (looked up in fp32) stay."""
    model, _, _ = model_and_examples(setup, "lora", r=4)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(model.model.layers[0].mlp.up_proj.weight.bfloat16().float())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = precision.store_frozen(model, torch.bfloat16)
    assert moved["model.layers.0.mlp.up_proj.weight"] == torch.float32  # bf16 numbers only: an exact move
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(moved[down], before[down])  # random fp32: rounded, the original kept
    assert torch.equal(model.get_parameter(down), before[down].bfloat16())
    assert not any("lora" in n or "norm" in n or "embed" in n for n in moved)
    assert model.get_parameter("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    precision.restore_frozen(model, moved)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def bf16_exact_base(model):
    """Round the frozen matrices to bf16 numbers, as a checkpoint saved in bf16 holds."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.ndim >= 2:
                p.copy_(p.bfloat16().float())


def test_bf16_run_trains_and_puts_the_base_back(setup, tmp_path):
    """During the run the base is bf16, the adapter fp32 and autocast on; afterwards the model is as it
    was but for the adapter. The loss starts where fp32's does, within the chunked-loss bound above
    (|z| stays below about 10 on this tiny model: 2U x 10 per token, 0.08) plus the forward's own roundings."""
    losses = {}
    for name in ("fp32", "bf16"):
        model, tok, examples = model_and_examples(setup, "lora", r=4)
        bf16_exact_base(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        seen = {}

        def look(step, record, model=model, seen=seen):
            seen["base"] = model.get_parameter("model.layers.0.mlp.up_proj.weight").dtype
            seen["lora"] = model.get_parameter("model.layers.0.mlp.up_proj.lora_A.default.weight").dtype
            seen["autocast"] = torch.is_autocast_enabled("cpu")

        config = TrainConfig(max_steps=3, batch_size=2, max_length=256, save_every=0, lr=1e-3, precision=name)
        history = train(model, examples, config, tmp_path / name, tokenizer=tok, on_step=look)
        losses[name] = [r["loss"] for r in history if "loss" in r]
        expected = (torch.bfloat16, torch.float32, True) if name == "bf16" else (torch.float32, torch.float32, False)
        assert (seen["base"], seen["lora"], seen["autocast"]) == expected
        assert not torch.is_autocast_enabled("cpu")
        for n, p in model.named_parameters():
            if n in before:
                assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    assert all(map(torch.isfinite, torch.tensor(losses["bf16"])))
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.1, losses


def test_mixed_precision_needs_fp32_trained_weights(setup, tmp_path):
    root, path = setup
    model = mc.load_model(path, dtype=torch.bfloat16)
    apply_method(model, "lora", r=4)
    tok = mc.load_tokenizer(path)
    examples = load_examples(root / "train.jsonl", tok, max_length=64)
    with pytest.raises(TrainingError, match=r"precision bf16 keeps the trained weights in float32.*load the model "
                                            r"in float32"):
        train(model, examples, TrainConfig(max_steps=1, precision="bf16"), tmp_path / "x", tokenizer=tok)
    assert not (tmp_path / "x").exists()


def test_fp16_scaler_skips_an_overflowed_step(setup, tmp_path, monkeypatch):
    """fp16 (CUDA's) path, run on the CPU: a loss scale of 2^127 overflows the gradients, so the step is
    skipped (the weights stay) and the scale halves; a normal scale trains."""
    monkeypatch.setattr(loop, "resolve", lambda name, device: precision.Precision("fp16", "test"))
    scaler = torch.amp.GradScaler
    for init_scale, trains in ((2.0**127, False), (2.0**10, True)):
        monkeypatch.setattr(torch.amp, "GradScaler", lambda device, s=init_scale: scaler(device, init_scale=s))
        model, tok, examples = model_and_examples(setup, "lora", r=4)
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        config = TrainConfig(max_steps=2, batch_size=2, max_length=256, save_every=0, lr=1e-3, precision="fp16")
        history = train(model, examples, config, tmp_path / str(init_scale), tokenizer=tok)
        scales = [r["loss_scale"] for r in history if "loss" in r]
        changed = any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)
        assert changed == trains
        assert scales == ([2.0**127, 2.0**126] if not trains else [2.0**10, 2.0**10])


def test_auto_picks_bf16_only_where_the_cpu_runs_it_fast(monkeypatch):
    flags, speed = set(), 2.0
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: speed)
    chosen = precision.resolve("auto", "cpu")
    assert chosen.name == "fp32" and "neither AVX512-BF16 nor AMX" in chosen.reason
    flags = {"avx512_bf16", "amx_bf16"}
    chosen = precision.resolve("auto", "cpu")
    assert chosen.name == "bf16" and "amx_bf16 and avx512_bf16" in chosen.reason and "2.0x" in chosen.reason
    speed = 0.6
    assert precision.resolve("auto", "cpu").name == "fp32"
    assert precision.resolve("bf16", "cpu") == precision.Precision("bf16", "asked for")
    assert precision.resolve("fp32", "cpu").name == "fp32"
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, auto, got 'fp8'"):
        precision.resolve("fp8", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="half")


def test_bf16_speedup_probe_measures():
    assert precision.bf16_matmul_speedup(n=64, repeats=1) > 0


def test_cli_precision(setup, tmp_path, capsys):
    from test_train import run

    run(setup, tmp_path / "a", "--precision", "bf16")
    assert "precision: bf16 (asked for)" in capsys.readouterr().err
    assert mc.load_adapter(mc.load_model(setup[1]), tmp_path / "a") is not None
    with pytest.raises(SystemExit):
        run(setup, tmp_path / "b", "--precision", "fp8")
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_a_fresh_checkpoint_moves_only_its_linear_weights(tmp_path):
    """make_checkpoint's random weights are not bf16 numbers: the bf16 run rounds the linears' weights once
    (autocast would at each matmul) and keeps the embedding, which the model also looks up, in fp32."""
    path, _ = make_checkpoint(tmp_path / "m", "smollm", vocab_size=64)
    model = mc.load_model(path)
    for p in model.parameters():
        p.requires_grad_(False)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    moved = precision.store_frozen(model, torch.bfloat16)
    tied = {"lm_head.weight"} - set(dict(model.named_parameters()))  # one tensor with the embedding's name
    assert linears - tied and set(moved) == linears - tied
    assert all(torch.is_tensor(v) for v in moved.values())
