"""The prompt rungs on SmolLM2-135M-Instruct, end to end, with the figures the README quotes.

    python examples/prompt_rungs_demo.py [--task examples/data/tasks/sentiment] [--out runs/prompt-rungs]
                                         [--part library,search,ladder]

1. library: every variant of examples/prompts/<task>.jsonl on the validation split (accuracy beside the
   log-likelihood accuracy of the labels, relevance and latency), ranked; the history file keeps the run.
2. search: prompt search (APE instructions, then bootstrapped demonstrations) from the library's best variant,
   on the validation split only, with its trace; then, separately, the test accuracy of the best library
   entry and of the prompt found.
3. ladder: a target the prompt rungs reach (nothing is trained), a higher one they cannot reach (the climb
   stops at the first training rung that does), and a higher one again (the rungs climbed are reused).
Every part reuses what an earlier run left in --out (the search's trace, the ladder's rungs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import minicustom as mc
from minicustom.cli_common import demo_model
from minicustom.compare import CompareConfig
from minicustom.ladder import ladder
from minicustom.ladder import markdown as ladder_markdown
from minicustom.precision import describe_cpu
from minicustom.prompt_library import best_variant, evaluate_library, evaluate_variant, ranking_markdown
from minicustom.prompt_search import SearchConfig, search
from minicustom.tasks import load_task


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="examples/data/tasks/sentiment")
    p.add_argument("--out", default="runs/prompt-rungs")
    p.add_argument("--part", default="library,search,ladder")
    p.add_argument("--targets", default="0.45,0.5,0.95", help="ladder targets: reached by prompts, not, higher")
    p.add_argument("--max-calls", type=int, default=2000, help="prompt search budget (model calls)")
    p.add_argument("--ladder-max-calls", type=int, default=600, help="the ladder's prompt-search rung budget")
    args = p.parse_args()
    parts, out, path = args.part.split(","), Path(args.out), demo_model()
    out.mkdir(parents=True, exist_ok=True)
    print(describe_cpu())
    name = Path(args.task).name
    library = out / f"{name}.jsonl"  # a copy, so the history file lands beside it in --out
    if not library.exists():
        library.write_text(Path(f"examples/prompts/{name}.jsonl").read_text())
    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    task = load_task(args.task, splits=("train", "validation"))

    if "library" in parts:
        t0 = time.perf_counter()
        scored = evaluate_library(model, tok, library, task, model_name=str(path), report=print)
        print(ranking_markdown(scored, task.name))
        print(f"library: {len(scored)} variants in {(time.perf_counter() - t0) / 60:.1f} min")

    if "search" in parts:
        start = best_variant(library, task.name, str(path))
        if start is None:
            raise SystemExit("run the library part first: the search starts from the library's best variant")
        result = search(model, tok, task, start, SearchConfig(max_calls=args.max_calls), out / "search", report=print)
        print(f"search: validation {result.base_accuracy:.3f} ({start.name}) -> {result.accuracy:.3f}, "
              f"{len(result.candidates)} candidates, {result.calls} calls, {result.minutes:.1f} min"
              f"{' (budget reached)' if result.stopped_by_budget else ''}")
        print("found:", json.dumps(result.best.to_json(), ensure_ascii=False))
        test = load_task(args.task, splits=("train", "test"))  # only now, after the search has ended
        for v in (start, result.best):
            acc = evaluate_variant(model, tok, v, test, test.test, score_choices=False).accuracy
            print(f"test accuracy of {v.name}: {acc:.3f} ({len(test.test)} questions)")

    if "ladder" in parts:
        low, high, higher = (float(x) for x in args.targets.split(","))
        for target in (low, high, higher):
            t0 = time.perf_counter()
            result = ladder(path, args.task, out / "ladder", target, config=CompareConfig(),
                            search_config=SearchConfig(max_calls=args.ladder_max_calls), report=print)
            print(ladder_markdown(result, task.name, target))
            print(f"ladder to {target}: {result.stopped}, {(time.perf_counter() - t0) / 60:.1f} min this call")


if __name__ == "__main__":
    main()
