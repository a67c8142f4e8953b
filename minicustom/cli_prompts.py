"""`minicustom prompts eval | search` and `minicustom ladder`: the prompt rungs before any training.

    minicustom prompts eval --library examples/prompts/sentiment.jsonl --task examples/data/tasks/sentiment
    minicustom prompts search --library examples/prompts/sentiment.jsonl --task ... --out runs/search
    minicustom ladder --task examples/data/tasks/sentiment --target 0.9 --out runs/ladder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .argtypes import COUNT, POSITIVE, PROBABILITY, SEED
from .checkpoint import load_model
from .cli_common import model_path
from .compare import CompareConfig
from .files import atomic_write
from .ladder import RUNGS, ladder
from .ladder import markdown as ladder_markdown
from .prompt_library import Variant, best_variant, evaluate_library, ranking_markdown, read_library
from .prompt_search import SearchConfig, search
from .tasks import load_task
from .tokenizer import load_tokenizer


def _report(line: str):
    print(line, file=sys.stderr)


def cmd_prompts_eval(args):
    """Score every variant of the library on the validation split; print the ranking; keep the history."""
    path = model_path(args)
    read_library(args.library)  # a bad library is refused before the model loads
    task = load_task(args.task, splits=("train", "validation"))
    model, tok = load_model(path), load_tokenizer(path)
    judge = (load_model(args.judge), load_tokenizer(args.judge)) if args.judge else None
    scored = evaluate_library(model, tok, args.library, task, model_name=str(path), limit=args.limit, seed=args.seed,
                              judge=judge, report=_report)
    table = ranking_markdown(scored, task.name)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "ranking.md", lambda p: p.write_text(table))
        atomic_write(out / "ranking.json", lambda p: p.write_text(json.dumps([s.row() for s in scored], indent=1) + "\n"))
    print(table, end="")


def _start(args, task_name: str, model: str) -> Variant:
    variants = {v.name: v for v in read_library(args.library)}
    if args.start:
        if args.start not in variants:
            raise ValueError(f"--start {args.start!r} is not a variant of {args.library} "
                             f"(it has {', '.join(variants)})")
        return variants[args.start]
    best = best_variant(args.library, task_name, model)
    if best is None:
        raise ValueError(f"{args.library} has no history on task {task_name!r} with this model: run `minicustom "
                         "prompts eval` first, or name the starting variant with --start")
    return best


def cmd_prompts_search(args):
    """APE instructions and/or bootstrapped demonstrations from the library's best variant; never the test split."""
    path = model_path(args)
    task = load_task(args.task, splits=("train", "validation"))
    base = _start(args, task.name, str(path))
    config = SearchConfig(method=args.method, rounds=args.rounds, candidates=args.candidates, keep=args.keep,
                          max_demos=args.max_demos, demo_candidates=args.demo_candidates, max_calls=args.max_calls,
                          max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens, limit=args.limit, seed=args.seed)
    config.check()
    model, tok = load_model(path), load_tokenizer(path)
    _report(f"searching from {base.name!r} ({config.method}); trace in {Path(args.out) / 'trace.jsonl'}")
    result = search(model, tok, task, base, config, args.out, report=_report)
    print(f"validation accuracy {result.base_accuracy:.3f} ({base.name}) -> {result.accuracy:.3f} "
          f"({len(result.candidates)} candidates, {result.calls} model calls, {result.tokens:,} tokens, "
          f"{result.minutes:.1f} min"
          f"{', budget reached' if result.stopped_by_budget else ''})")
    print(json.dumps(result.best.to_json(), ensure_ascii=False))


def cmd_ladder(args):
    """Climb from zero-shot until a rung reaches --target on the validation split."""
    config = CompareConfig(examples=args.examples, epochs=args.epochs, test_limit=args.test_limit, seed=args.seed)
    search_config = SearchConfig(max_calls=args.search_calls, seed=args.seed)
    rungs = RUNGS[:RUNGS.index(args.up_to) + 1] if args.up_to else RUNGS
    result = ladder(model_path(args), args.task, args.out, args.target, budget_minutes=args.budget_minutes,
                    config=config, search_config=search_config, rungs=rungs, report=_report)
    print(ladder_markdown(result, load_task(args.task, splits=()).name, args.target), end="")


def add_prompts(sub):
    p = sub.add_parser("prompts", help="prompt library: eval (rank variants) | search (APE, bootstrapped demos)")
    kinds = p.add_subparsers(dest="kind", required=True)
    for name, func, text in (("eval", cmd_prompts_eval, "score every variant of a library on the validation split"),
                             ("search", cmd_prompts_search, "search instructions and demonstrations from the "
                                                            "library's best variant (validation split only)")):
        q = kinds.add_parser(name, help=text)
        q.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
        q.add_argument("--library", required=True, help="JSONL prompt library (see examples/prompts/)")
        q.add_argument("--task", required=True, help="task folder with train.jsonl and validation.jsonl")
        q.add_argument("--limit", type=COUNT, help="score on the first N validation records only")
        q.add_argument("--seed", type=SEED, default=0)
        q.set_defaults(func=func)
        if name == "eval":
            q.add_argument("--out", help="also write ranking.md and ranking.json here")
            q.add_argument("--judge", help="checkpoint folder of a judge model that rates every answer 1-10 "
                                           "against its reference (LLM-as-a-judge)")
            continue
        q.add_argument("--out", required=True, help="search folder: trace.jsonl (resumable) and best.json")
        q.add_argument("--start", help="the variant to start from (default: the library's best by its history)")
        q.add_argument("--method", choices=["ape", "bootstrap", "both"], default="both")
        q.add_argument("--rounds", type=COUNT, default=3, help="APE rounds")
        q.add_argument("--candidates", type=COUNT, default=6, help="APE instructions proposed per round")
        q.add_argument("--keep", type=COUNT, default=2, help="APE instructions resampled per round")
        q.add_argument("--max-demos", type=COUNT, default=4, help="demonstrations kept at most")
        q.add_argument("--demo-candidates", type=COUNT, default=12, help="train records tried as demonstrations")
        q.add_argument("--max-calls", type=COUNT, help="budget of model calls (answers and proposals)")
        q.add_argument("--max-tokens", type=COUNT, help="budget of tokens (prompts and answers) for the search")
        q.add_argument("--max-prompt-tokens", type=COUNT, help="longest prompt (shots are dropped to fit)")
    p = sub.add_parser("ladder", help="climb from zero-shot; stop at the first rung reaching --target (validation)")
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--task", required=True, help="task folder with train, validation and test JSONL")
    p.add_argument("--target", type=PROBABILITY, required=True, help="validation accuracy to reach, in (0, 1]")
    p.add_argument("--out", required=True, help="a subfolder per rung (reused by a later call), ladder.md")
    p.add_argument("--budget-minutes", type=POSITIVE, help="start no rung after this much time in all")
    p.add_argument("--up-to", choices=RUNGS, help="the highest rung to try (default: full)")
    p.add_argument("--examples", type=COUNT, default=64, help="training records per rung (and few-shot pool)")
    p.add_argument("--epochs", type=POSITIVE, default=2.0)
    p.add_argument("--search-calls", type=COUNT, default=2000, help="model calls the prompt-search rung may use")
    p.add_argument("--test-limit", type=COUNT, help="report test accuracy on the first N test records only")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_ladder)
