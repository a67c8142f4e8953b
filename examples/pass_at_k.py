"""How much room a verifiable reward leaves RL: greedy accuracy against k samples per problem.

    python examples/pass_at_k.py --adapter runs/arith-sft --data examples/data/tasks/arithmetic/test.jsonl \
        -k 8 --temperature 0.7

Prints the greedy accuracy, the mean accuracy of the samples, pass@k (at least one of the k right), the
share of problems whose k samples are all wrong, the majority vote of the k, and the share of the greedy
answers' "a op b = c" steps that are wrong. GRPO learns only from problems with some right and some wrong
samples, and sharpening alone cannot take greedy past pass@k.
"""

import argparse
from collections import Counter

import torch
from arithmetic_reward import OPS, STEP

import minicustom as mc
from minicustom.evaluate import extract_answer, number_match
from minicustom.gguf import fetch_demo_model
from minicustom.methods import load_adapter
from minicustom.train.rollout import SamplingConfig, load_prompts, sample


def wrong_steps(text: str) -> tuple[int, int]:
    steps = STEP.findall(text)
    return sum(OPS[op](int(a), int(b)) != int(c) for a, op, b, c in steps), len(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the demo SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--data", required=True, help="JSONL records with an `answer` (a number)")
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    path = args.model or fetch_demo_model()
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    if args.adapter:
        load_adapter(model, args.adapter)
    prompts = load_prompts(args.data, tok, 1024)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    stop, pad = [tok.eos_token_id], tok.pad_token_id or 0
    greedy, bad, steps = 0, 0, 0
    for i in range(0, len(prompts), 16):
        part = prompts[i:i + 16]
        for p, text in zip(part, sample(model, tok, part, config, stop, pad, greedy=True)[1]):
            greedy += number_match(text, p.record["answer"])
            b, n = wrong_steps(text)
            bad, steps = bad + b, steps + n
    g, right, vote = torch.Generator().manual_seed(args.seed), [], 0
    per_call = max(1, 32 // args.k)
    for i in range(0, len(prompts), per_call):
        part = prompts[i:i + per_call]
        texts = sample(model, tok, [p for p in part for _ in range(args.k)], config, stop, pad, generator=g)[1]
        for j, p in enumerate(part):
            mine = texts[j * args.k:(j + 1) * args.k]
            right.append(sum(number_match(t, p.record["answer"]) for t in mine))
            answers = Counter(a for a in (extract_answer(t, "number") for t in mine) if a is not None)
            vote += bool(answers) and number_match(answers.most_common(1)[0][0], p.record["answer"])
    n, k = len(prompts), args.k
    print(f"{n} problems: greedy {greedy / n:.3f} ({bad} of {steps} greedy steps wrong); {k} samples at temperature "
          f"{args.temperature}, top-p {args.top_p}: mean {sum(right) / n / k:.3f}, pass@{k} "
          f"{sum(r > 0 for r in right) / n:.3f}, all wrong {sum(r == 0 for r in right) / n:.3f}, majority vote "
          f"{vote / n:.3f}")


if __name__ == "__main__":
    main()
