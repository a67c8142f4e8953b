"""Data parallel training under torchrun (gloo, 2 CPU processes) gives the single-process loss curve."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import metrics

pytestmark = pytest.mark.slow  # torchrun starts two processes per test
ROOT = Path(__file__).parents[1]


def args(setup, out, batch_size, method):
    root, path = setup
    return ["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--eval-data",
            str(root / "eval.jsonl"), "--out", str(out), "--max-length", "256", "--batch-size", str(batch_size),
            "--grad-accum", "2", "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--method", method,
            "--lr", "1e-3", "--exact-match", "0"]


def launch(argv, nproc, extra_path=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [ROOT, *([extra_path] if extra_path else [])])),
           "OMP_NUM_THREADS": "1"}
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *runner, "-m", "minicustom.cli", *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method", ["lora", "full"])  # DDP for adapters, FSDP2 for full fine-tuning
def test_two_processes_match_one(setup, tmp_path, method):
    launch(args(setup, tmp_path / "one", 2, method), 1)
    launch(args(setup, tmp_path / "two", 1, method), 2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r.get("trained_tokens") for r in one] == [r.get("trained_tokens") for r in two]
    for a, b in zip(one, two):
        # the same sums in another order (per process, then all-reduced): fp32 round-off only
        for key in ("loss", "grad_norm", "eval_loss"):  # step 0 holds only the eval before training
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_fsdp_resume_replays_the_curve(setup, tmp_path):
    """FSDP2 checkpoints gather full tensors and shard them again on load: a run rolled back to its step-2
    checkpoint (as if killed after it) and resumed writes the uninterrupted run's losses exactly."""
    import shutil

    launch(args(setup, tmp_path / "a", 1, "full"), 2)
    launch(args(setup, tmp_path / "b", 1, "full"), 2)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-000004")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("checkpoint-000002\n")
    launch(args(setup, tmp_path / "b", 1, "full") + ["--resume"], 2)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_two_processes_match_one(setup, tmp_path, method):
    """DPO on the same loop: pairs split over two processes give the one-process curve. LoRA against the
    base (adapters disabled inside DDP's forward); full fine-tuning (FSDP2) against the model folder."""
    from test_dpo import pair_records

    root, path = setup
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_records()))

    def dpo(out, batch_size):
        return ["train", "dpo", "--model", str(path), "--data", str(tmp_path / "prefs.jsonl"), "--eval-data",
                str(tmp_path / "prefs.jsonl"), "--out", str(out), "--batch-size", str(batch_size), "--grad-accum",
                "2", "--max-steps", "3", "--eval-every", "3", "--method", method, "--lr", "1e-3",
                "--reference", "base" if method == "lora" else str(path)]
    launch(dpo(tmp_path / "one", 2), 1)
    launch(dpo(tmp_path / "two", 1), 2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r.get("pairs") for r in one] == [r.get("pairs") for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "eval_loss", "eval_policy_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a["step"])
        # The margin beta*((pi_w - ref_w) - (pi_l - ref_l)) is a small difference of log-probs of magnitude
        # |logp|: each log-prob agrees to rel 1e-5 (summation orders differ between the splits and between
        # CPUs' kernels), so the margin agrees to beta * 1e-5 * (the four |log-probs|), not relatively.
        logps = ("logps/chosen", "logps/rejected", "ref_logps/chosen", "ref_logps/rejected")
        if "rewards/margins" in a:  # training steps (the step-0 record holds eval metrics only)
            scale = 0.1 * sum(abs(a[k]) for k in logps)
            assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=0, abs=1e-5 * scale + 1e-7)
            for k in logps:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a["step"])
    assert abs(one[0]["eval_loss"] - 0.6931471805599453) < 1e-6 and one[-1]["eval_loss"] != one[0]["eval_loss"]


def test_grpo_two_processes_match_one(setup, tmp_path):
    """GRPO on the same loop: each process samples the whole rollout (one seed: the same completions) and
    trains on its half of the rows; the curve is the one-process run's."""
    root, path = setup
    rows = [{"prompt": f"Name city {i}.", "answer": "Paris"} for i in range(8)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rl_reward.py").write_text("def spread(prompts, completions, records):\n"
                                           "    return [sum(map(ord, c)) % 101 / 10 for c in completions]\n")

    def grpo(out, batch_size):
        return ["train", "grpo", "--model", str(path), "--data", str(tmp_path / "prompts.jsonl"), "--reward",
                "rl_reward:spread", "--out", str(out), "--batch-size", str(batch_size),
                "--num-generations", "2", "--max-steps", "3", "--num-iterations", "2", "--max-new-tokens", "6",
                "--max-length", "64", "--lr", "1e-3", "--beta", "0.1", "--log-completions", "0"]
    launch(grpo(tmp_path / "one", 4), 1, tmp_path)
    launch(grpo(tmp_path / "two", 2), 2, tmp_path)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r.get("weight") for r in one] == [r.get("weight") for r in two] == [4, 4, 4]
    for a, b in zip(one, two):
        assert a.get("reward") == b.get("reward")  # the same samples
        for key in ("loss", "grad_norm", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a["step"])
    assert one[1]["grad_norm"] > 0
