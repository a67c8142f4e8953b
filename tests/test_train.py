"""The trainer: gradient accumulation, checkpointing, resume after a kill, NaN stop, schedule, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_checkpoint, write_tokenizer

import minicustom as mc
from minicustom.cli import main
from minicustom.data import IGNORE, collate, load_examples, make_example
from minicustom.methods import apply_method
from minicustom.train import TrainConfig, TrainingError, loop, train
from minicustom.train.loop import accumulate_gradients, lr_factor, param_groups
from minicustom.train.sft import SFTLoss


def model_and_examples(setup, method="lora", **hp):
    root, path = setup
    tok = mc.load_tokenizer(path)
    model = mc.load_model(path)
    torch.manual_seed(0)
    apply_method(model, method, **hp)
    if method != "full":  # start from a non-zero B so that every LoRA/DoRA gradient is non-trivial
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model, tok, load_examples(root / "train.jsonl", tok, max_length=256)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_accumulation_equals_one_batch(setup, method):
    """k micro-batches of 1 example == 1 batch of k examples == mean CE over every trained token."""
    model, _, examples = model_and_examples(setup, method, r=4)
    ex = examples[:5]
    wrapper = SFTLoss(model, chunk=7)
    loss_a, n_a, *_ = accumulate_gradients(wrapper, [collate([[e]], 0) for e in ex], "cpu")
    g_a = grads(model)
    model.zero_grad()
    loss_b, n_b, *_ = accumulate_gradients(wrapper, [collate([[e] for e in ex], 0)], "cpu")
    g_b = grads(model)
    model.zero_grad()
    logits = [model(torch.tensor([e.input_ids]))[0, :-1] for e in ex]
    targets = torch.cat([torch.tensor(e.labels[1:]) for e in ex])
    reference = F.cross_entropy(torch.cat(logits), targets, ignore_index=IGNORE)  # mean over all trained tokens
    reference.backward()
    g_ref = grads(model)
    assert n_a == n_b == int((targets != IGNORE).sum())
    torch.testing.assert_close(torch.tensor(loss_a, dtype=torch.float64), reference.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(loss_b, dtype=torch.float64), reference.detach().double(), rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys() == g_ref.keys() and len(g_a) > 0
    for name in g_a:
        scale = g_ref[name].abs().max()  # compare relative to the largest entry (see test_lora_peft DoRA)
        torch.testing.assert_close(g_a[name] / scale, g_ref[name] / scale, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(g_b[name] / scale, g_ref[name] / scale, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(setup, method):
    model, _, examples = model_and_examples(setup, method, r=4, dropout=0.0)
    batch = collate([[e] for e in examples[:3]], 0)
    wrapper = SFTLoss(model, chunk=64)
    model.train()
    accumulate_gradients(wrapper, [batch], "cpu")
    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing = True
    accumulate_gradients(wrapper, [batch], "cpu")
    assert grads(model).keys() == plain.keys()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=0, atol=0, msg=name)  # same ops, recomputed



@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_activations_give_the_same_gradients(setup, checkpointing):
    """activation_offload copies what autograd saves to CPU memory and back (here CPU to CPU, which runs the
    same hooks); with per-block checkpointing what it holds is each block's input and the RoPE tables."""
    model, _, examples = model_and_examples(setup, "lora", r=4, dropout=0.0)
    batch = collate([[e] for e in examples[:3]], 0)
    wrapper = SFTLoss(model, chunk=64)
    model.train()
    model.gradient_checkpointing = checkpointing
    accumulate_gradients(wrapper, [batch], "cpu")
    plain = grads(model)
    model.zero_grad()
    with loop.activation_offload(TrainConfig(offload_activations=True), torch.device("cpu")):
        accumulate_gradients(wrapper, [batch], "cpu")
    assert grads(model).keys() == plain.keys()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, plain[name], rtol=0, atol=0, msg=name)  # the same values, moved and back
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        wrapper(**batch)[0].backward()
    C, (B, T) = model.config.hidden_size, batch["input_ids"].shape
    blocks = sum(shape == (B, T, C) for shape in saved)
    L, inner = model.config.num_hidden_layers, sum(s[-1] == model.config.intermediate_size for s in saved)
    if checkpointing:  # per block its input, RoPE's cos and sin, the mask; then the final norm's input and output
        assert (blocks, inner) == (L + 2, 0) and len(saved) <= 4 * L + 8
    else:  # every block's activations, the MLP's among them
        assert inner >= 3 * L and len(saved) > 20 * L


def test_offloading_activations_needs_cuda(setup, tmp_path):
    model, tok, examples = model_and_examples(setup, "lora", r=4)
    with pytest.raises(TrainingError, match=r"^offload_activations moves the activations saved for backward from the "
                       r"GPU to CPU memory, but the model is on cpu: leave it off there$"):
        train(model, examples, TrainConfig(offload_activations=True, max_steps=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()

def test_lr_schedule():
    c = TrainConfig(warmup_steps=3, schedule="cosine")
    assert [lr_factor(s, 13, c) for s in range(3)] == [0.25, 0.5, 0.75]
    assert lr_factor(3, 13, c) == 1.0 and lr_factor(8, 13, c) == pytest.approx(0.5)
    assert lr_factor(13, 13, c) == pytest.approx(0.0, abs=1e-12)
    lin = TrainConfig(schedule="linear")
    assert [lr_factor(s, 4, lin) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="schedule must be"):
        TrainConfig(schedule="step")


def test_param_groups_decay_only_matrices(setup):
    model, _, _ = model_and_examples(setup, "full")
    groups = param_groups(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2 and "embed" not in name), name
    lora, _, _ = model_and_examples(setup, "dora")
    groups = param_groups(lora, TrainConfig(lr=1e-3, lora_plus_ratio=16))
    assert [g["lr"] for g in groups] == [1e-3, 16e-3, 1e-3]  # A, B, DoRA magnitudes (no decay)


def run(setup, out, *extra):
    root, path = setup
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--eval-data",
          str(root / "eval.jsonl"), "--out", str(out), "--max-length", "256", "--batch-size", "2",
          "--max-steps", "8", "--save-every", "3", "--eval-every", "4", "--exact-match", "2",
          "--max-new-tokens", "4", "--seed", "3", *extra])


def metrics(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.mark.slow  # a killed subprocess, then a resume
def test_resume_after_kill_reproduces_the_curve(setup, tmp_path):
    """SIGKILL after step 5 (checkpoint at step 3), resume: the same metrics, bit for bit, and weights."""
    extra = ["--dropout", "0.1", "--warmup-steps", "2"]  # dropout: the RNG state must come back too
    run(setup, tmp_path / "straight", *extra)
    root, path = setup
    killed = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "import minicustom.train as T\n"
        "inner = T.train\n"
        "def train(*a, **k):\n"
        "    k['on_step'] = lambda step, rec: os.kill(os.getpid(), signal.SIGKILL) if step == 5 else None\n"
        "    return inner(*a, **k)\n"
        "T.train = train\n"
        "from minicustom.cli import main\n"
        f"main({json.dumps(['train', 'sft', '--model', str(path), '--data', str(root / 'train.jsonl'), '--eval-data', str(root / 'eval.jsonl'), '--out', str(killed), '--max-length', '256', '--batch-size', '2', '--max-steps', '8', '--save-every', '3', '--eval-every', '4', '--exact-match', '2', '--max-new-tokens', '4', '--seed', '3', *extra])})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "checkpoint-000003"
    assert len(metrics(killed)) == 6 and not (killed / "adapter_model.safetensors").exists()
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        run(setup, killed, *extra)
    run(setup, killed, *extra, "--resume")
    assert metrics(killed) == metrics(tmp_path / "straight")
    assert len(metrics(killed)) == 9 and "exact_match" in metrics(killed)[4]
    from safetensors.torch import load_file

    a, b = load_file(killed / "adapter_model.safetensors"), load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path):
    model, tok, examples = model_and_examples(setup, "lora", r=4)

    def poison(step, record):
        if step == 4:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    config = TrainConfig(max_steps=8, batch_size=2, max_length=256, save_every=3)
    with pytest.raises(TrainingError, match=r"the loss is nan .* at step 5; the weights were not updated\. "
                                            r"Last good checkpoint: .*checkpoint-000003"):
        train(model, examples, config, tmp_path, on_step=poison)
    ckpt = tmp_path / "checkpoints" / "checkpoint-000003"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
    assert len(metrics(tmp_path)) == 4


@pytest.mark.parametrize("existed", [False, True])
def test_a_new_run_that_fails_at_its_first_step_leaves_no_trace(setup, tmp_path, existed):
    """A NaN at step 1 of a new run keeps nothing (no checkpoint exists to resume from): the folders and the
    metrics file it made are removed, and an output folder that was there before stays, empty."""
    model, tok, examples = model_and_examples(setup, "lora", r=4)
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    out = tmp_path / "run"
    if existed:
        out.mkdir()
    config = TrainConfig(max_steps=3, batch_size=2, max_length=256)
    with pytest.raises(TrainingError, match=r"at step 1; the weights were not updated\. Last good checkpoint: none"):
        train(model, examples, config, out, eval_examples=examples[:2])
    assert (list(out.iterdir()) == []) if existed else not out.exists()


def test_cli_outputs(setup, tmp_path):
    root, path = setup
    run(setup, tmp_path / "lora", "--method", "dora")
    out = tmp_path / "lora"
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "train_config.json"):
        assert (out / name).exists(), name
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    model = mc.load_model(path)
    mc.load_adapter(model, out)  # the result loads back
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(0, 9))  # step 0: eval before training
    assert all(k in rows[i] for k in ("eval_loss", "eval_ppl", "exact_match") for i in (0, 4, 8))
    run(setup, tmp_path / "full", "--method", "full", "--lr", "1e-4")
    full = mc.load_model(tmp_path / "full")
    base = mc.load_model(path)
    assert not torch.equal(full.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert (tmp_path / "full" / "tokenizer.json").exists()


def test_cli_errors(setup, tmp_path, capsys):
    root, path = setup
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "x"\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: not valid JSON"):
        main(["train", "sft", "--model", str(path), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(tmp_path),
              "--method", "magic"])
    assert e.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--adapter is not taken"):
        main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(tmp_path),
              "--adapter", str(tmp_path)])
    vocab = tmp_path / "small"
    make_checkpoint(vocab, "smollm", vocab_size=300)  # the test tokenizer has 400 tokens
    write_tokenizer(vocab)
    with pytest.raises(SystemExit, match="the tokenizer has 400 tokens but the model's vocabulary is 300"):
        main(["train", "sft", "--model", str(vocab), "--data", str(root / "train.jsonl"), "--out", str(tmp_path)])


def test_inspect_data(setup, tmp_path, capsys):
    root, path = setup
    main(["inspect-data", "--model", str(path), "--data", str(root / "train.jsonl"), "-n", "2", "--color", "never"])
    out = capsys.readouterr().out
    assert "\u27e6 In Paris.<|im_end|>\u27e7" in out  # the first record: completion and EOS trained
    assert "=== 24 examples" in out
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit) as e:
        main(["inspect-data", "--model", str(path), "--data", str(tmp_path / "d.jsonl"), "--color", "always"])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "d.jsonl:2" in captured.err and "no assistant turn" in captured.err
    assert "\x1b[30;42m" in captured.out


def test_masks_of_examples_in_training_batches(setup):
    """What reaches the loss is exactly the trained tokens of each example, packed or not."""
    root, path = setup
    tok = mc.load_tokenizer(path)
    ex = make_example({"prompt": "Where is Oslo?", "completion": " In Norway."}, tok)
    batch = collate([[ex, ex]], 0)
    targets = batch["labels"][0, 1:]
    trained = targets[targets != IGNORE].tolist()
    assert tok.decode(trained) == " In Norway.<|im_end|>" * 2
