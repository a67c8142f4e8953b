"""The RLHF rung on SmolLM2-135M-Instruct on a CPU: a reward model, GRPO with a verifiable reward, PPO
against the reward model, and KTO on unpaired labels, each run through the `minicustom train` commands,
before and after figures printed with the time each took.

    python examples/rlhf_demo.py [PART ...] [--out runs/rlhf] [--seed N]   # PART: rm grpo ppo kto (default: all)

(a) rm    a LoRA reward model on the shipped sentiment and city preference pairs; held-out pairwise
          accuracy (the validation pairs) before and after.
(b) grpo  a one-epoch LoRA SFT warm start on the arithmetic task (its accuracy is GRPO's starting point),
          then GRPO with a verifiable reward: the `number` scorer plus half the credit of the reference steps
          reached by a true calculation (examples/arithmetic_reward.py), with DAPO's dynamic sampling (one
          more draw of fresh problems for the groups whose 8 rewards are all equal), one update per rollout,
          DAPO's token-level loss, for 40 steps (what fits in 30 minutes on a 2-core AVX2 CPU in fp32, with
          room for a slower seed), printing the validation curve; then greedy accuracy of the start and end
          adapters on the 400 held-out problems of test_large, with the gain's standard error.
(c) ppo   PPO on the sentiment prompts with the reward model of (a) as the reward; the mean reward of greedy
          answers to the held-out prompts before and after, and the KL to the reference.
(d) kto   KTO on unpaired thumbs-up/down records (each sentiment prompt keeps one of its two completions);
          held-out preference accuracy (the validation pairs) before and after.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from minicustom.gguf import fetch_demo_model
from minicustom.precision import describe_cpu

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "examples/data/tasks"


def train(kind: str, out: Path, *args) -> tuple[list[dict], float]:
    """Run `minicustom train KIND ... --out OUT` (a finished run is reused, an interrupted one resumed); returns
    its metrics and the seconds this call took."""
    done = out / "metrics.done.json"
    if done.exists():
        saved = json.loads(done.read_text())
        return saved["metrics"], saved["seconds"]
    argv = [sys.executable, "-m", "minicustom", "train", kind, *map(str, args), *SEED, "--out", str(out)]
    if (out / "checkpoints" / "latest").exists():  # an interrupted run of this script: continue it
        argv.append("--resume")
    print("$", " ".join(argv[2:]), flush=True)
    t0 = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # examples.arithmetic_reward
    subprocess.run(argv, check=True, env={**os.environ, "PYTHONPATH": path})
    seconds = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    done.write_text(json.dumps({"metrics": metrics, "seconds": seconds}))
    return metrics, seconds


def first_last(metrics: list[dict], key: str) -> tuple[float, float]:
    values = [m[key] for m in metrics if key in m]
    return values[0], values[-1]


def concat(out: Path, *files: Path) -> Path:
    out.write_text("".join(f.read_text() for f in files))
    return out


def part_rm(model: Path, out: Path):
    data = concat(out / "rm_train.jsonl", TASKS / "sentiment/prefs_train.jsonl", TASKS / "city/prefs_train.jsonl")
    held = concat(out / "rm_validation.jsonl", TASKS / "sentiment/prefs_validation.jsonl",
                  TASKS / "city/prefs_validation.jsonl")
    metrics, seconds = train("rm", out / "rm", "--model", model, "--data", data, "--eval-data", held, "--epochs", 1,
                             "--batch-size", 8, "--lr", 5e-4, "--log-every", 5)
    before, after = first_last(metrics, "eval_accuracy")
    print(f"(a) reward model: held-out pairwise accuracy {before:.3f} -> {after:.3f} on {held.read_text().count(chr(10))}"
          f" pairs, {len(metrics) - 1} steps in {seconds / 60:.1f} min")


def held_out_scores(model_path: Path, adapter: Path, records: Path) -> tuple[list[float], float]:
    """Each record's greedy score with `adapter` (the `number` scorer, GRPO's 64 new tokens, in float32:
    bf16's rounding flips a few near-tied greedy answers), and the seconds it took."""
    import minicustom as mc
    from minicustom.evaluate import evaluate_task

    t0 = time.perf_counter()
    model, tokenizer = mc.load_model(model_path), mc.load_tokenizer(model_path)
    mc.load_adapter(model, adapter)
    result = evaluate_task(model, tokenizer, records, scorer="number", max_new_tokens=64, batch_size=32)
    return [r["score"] for r in result.records], time.perf_counter() - t0


def part_grpo(model: Path, out: Path):
    task = TASKS / "arithmetic"
    # a short LoRA SFT warm start that teaches the answer's form: the first 64 worked problems, one epoch of
    # batch 4 (two epochs, compare's LoRA row, start at 0.389 and leave GRPO less to gain: README)
    sft_data = out / "arith_sft64.jsonl"
    sft_data.write_text("".join((task / "train.jsonl").read_text().splitlines(keepends=True)[:64]))
    _, sft_seconds = train("sft", out / "arith-sft", "--model", model, "--data", sft_data, "--epochs", 1,
                           "--batch-size", 4, "--no-packing", "--lr", 1e-3, "--exact-match", 0)
    # the final answer's 0/1 plus half the credit of the reference steps reached by a true calculation
    # (examples/arithmetic_reward.py), so that a group of wrong answers still teaches; a short warmup, as
    # Adam's first steps move every weight by the full lr whatever its gradient (without it, one token's
    # log-prob fell 11.8 nats in the first step); dynamic sampling, since half of a rollout's groups had
    # all-equal rewards, which teach nothing (frac_reward_zero_std 0.5 at the first step); one update per
    # rollout and no KL term (TRL's defaults, num_iterations 1 and beta 0): no old or reference log-prob
    # forwards, so a step's time buys fresh samples (a second update on the same rollout cost about as much
    # as a new one); DAPO's token-level loss, since GRPO's per-completion mean let completions grow until
    # validation fell from 0.383 to 0.133 (README); the run watches the validation split (`number` alone)
    metrics, seconds = train("grpo", out / "grpo", "--model", model, "--adapter", out / "arith-sft", "--data",
                             task / "train.jsonl", "--eval-data", task / "validation.jsonl", "--reward",
                             "number,examples.arithmetic_reward:steps", "--reward-weights", "1,0.5",
                             "--max-steps", GRPO_STEPS, "--batch-size", 32, "--num-generations", 8, "--lr", 2e-4,
                             "--warmup-steps", 6, "--schedule", "constant", "--loss-type", "dapo", "--temperature", 0.7,
                             "--max-new-tokens", 64, "--eval-every", GRPO_STEPS // 2, "--precision", "auto", "--dynamic-sampling", 1)
    curve = [(m["step"], m["eval_reward/number"]) for m in metrics if "eval_reward/number" in m]
    print(f"(b) GRPO: greedy validation accuracy {' -> '.join(f'{a:.3f}' + (f' ({s})' if s else '') for s, a in curve)}"
          f" on 60 problems; {len(metrics) - 1} steps in {seconds / 60:.1f} min after a {sft_seconds / 60:.1f} min "
          f"LoRA SFT warm start ({(seconds + sft_seconds) / 60:.1f} min in all, validation checks included)")
    # the held-out measurement: the 400 problems of test_large (the 90 of test move 1.1 points a problem)
    held = task / "test_large.jsonl"
    before, t_before = held_out_scores(model, out / "arith-sft", held)
    after, t_after = held_out_scores(model, out / "grpo", held)
    n, gained, lost = len(before), sum(a > b for a, b in zip(after, before)), sum(a < b for a, b in zip(after, before))
    gain = (sum(after) - sum(before)) / n
    stderr = math.sqrt(gained + lost - n * gain ** 2) / n  # of a paired difference of two accuracies
    print(f"(b) GRPO: greedy held-out accuracy {sum(before) / n:.3f} -> {sum(after) / n:.3f} ({100 * gain:+.1f} "
          f"points, standard error {100 * stderr:.1f}: {gained} problems newly right, {lost} newly wrong) on {n} "
          f"arithmetic problems (test_large), start and end adapters ({(t_before + t_after) / 60:.1f} min to "
          "evaluate, not part of the training time)")


def part_ppo(model: Path, out: Path):
    task = TASKS / "sentiment"
    metrics, seconds = train("ppo", out / "ppo", "--model", model, "--data", task / "train.jsonl", "--eval-data",
                             task / "validation.jsonl", "--reward", out / "rm", "--max-steps", PPO_STEPS,
                             "--batch-size", 8, "--num-ppo-epochs", 2, "--lr", 1e-4, "--max-new-tokens", 16,
                             "--beta", 0.05, "--log-completions", 10)
    before, after = first_last(metrics, "eval_reward")
    kl = [m["kl"] for m in metrics if "kl" in m]
    print(f"(c) PPO: mean reward-model score of greedy answers to {task.name}'s 60 held-out prompts {before:+.3f} -> "
          f"{after:+.3f}; KL to the reference per completion (last rollout) {kl[-1]:.3f}; {len(metrics) - 1} steps "
          f"in {seconds / 60:.1f} min")


def part_kto(model: Path, out: Path):
    task = TASKS / "sentiment"
    records = []
    for i, line in enumerate((task / "prefs_train.jsonl").read_text().splitlines()):
        pair = json.loads(line)  # each prompt keeps one completion: thumbs up or down, never both
        keep = "chosen" if i % 2 == 0 else "rejected"
        records.append({"prompt": pair["prompt"], "completion": pair[keep], "label": keep == "chosen"})
    unpaired = out / "kto_unpaired.jsonl"
    unpaired.write_text("".join(json.dumps(r) + "\n" for r in records))
    metrics, seconds = train("kto", out / "kto", "--model", model, "--data", unpaired, "--eval-data",
                             task / "prefs_validation.jsonl", "--reference", "base", "--epochs", 2, "--batch-size", 8,
                             "--lr", 2e-4)
    before, after = first_last(metrics, "eval_policy_accuracy")
    implicit = metrics[-1]["eval_rewards/accuracies"]
    print(f"(d) KTO: held-out preference accuracy (log pi(chosen) > log pi(rejected)) {before:.3f} -> {after:.3f} "
          f"on 60 validation pairs; implicit-reward accuracy after {implicit:.3f}; {len(records)} unpaired records, "
          f"{len(metrics) - 1} steps in {seconds / 60:.1f} min")


GRPO_STEPS, PPO_STEPS = 40, 40
SEED: list[str] = []  # --seed N, passed to every run
PARTS = {"rm": part_rm, "grpo": part_grpo, "ppo": part_ppo, "kto": part_kto}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/rlhf"))
    parser.add_argument("--seed", type=int, help="every run's seed (default: the trainers' own, 0)")
    args = parser.parse_args()
    if args.seed is not None:
        SEED[:] = ["--seed", str(args.seed)]
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    model = fetch_demo_model()
    print(f"SmolLM2-135M-Instruct on {describe_cpu()}, float32 (GRPO: --precision auto, bf16 where the CPU has "
          "fast bf16 matmuls)")
    for name in args.parts or PARTS:
        PARTS[name](model, args.out)
