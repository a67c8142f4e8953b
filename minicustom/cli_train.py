"""`minicustom train sft | dpo`: load the model, attach a registered method with the options given, train,
export. The method names, option flags, groups and defaults come from the registry (methods/registry.py):
a registered method appears here with nothing else to edit.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .argtypes import COUNT, COUNT0, FINITE, NONNEGATIVE, POSITIVE, SEED, checked, float_list
from .checkpoint import copy_tokenizer_files
from .cli_common import add_data_args, add_model_args, check_run_folder, data_options, load, model_path
from .data import load_examples, load_preferences, pad_id_for
from .files import write_json
from .gguf import cache_root
from .losses import LOSS_TYPES
from .methods import adapter_configs, load_adapter
from .methods.base import Method, Option, find_targets, linear_like
from .methods.registry import REGISTRY, apply_method, get_method
from .prompting import default_stop_ids
from .train import DPOConfig, TrainConfig, export, train, train_dpo
from .vocab import save_extended_base


def init_distributed(args) -> int:
    """Under torchrun: join the process group (nccl on CUDA, gloo on CPU); returns this process's rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():  # launched by torchrun
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(args.device)
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def load_for_training(args):
    model, tok = load(args)
    check_vocab(tok, model)
    return model, tok


def check_vocab(tok, model):
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}: they do not belong together")


def train_options(args, default_lr: float) -> dict:
    """The TrainConfig fields both trainers take from the command line; no --lr: `default_lr` (the method's,
    or DPO's), written back into args for train_config.json."""
    args.lr = args.lr or default_lr
    return dict(lr=args.lr, weight_decay=args.weight_decay, lora_plus_ratio=args.lora_plus_ratio,
                schedule=args.schedule, warmup_steps=args.warmup_steps, epochs=args.epochs,
                max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                max_length=args.max_length, max_grad_norm=args.max_grad_norm or None,
                gradient_checkpointing=args.gradient_checkpointing,
                offload_activations=args.offload_activations, seed=args.seed, log_every=args.log_every,
                eval_every=args.eval_every, save_every=args.save_every, log=args.log, precision=args.precision,
                optim=args.optim)


def method_options(args, method: Method, rank: int) -> dict:
    """The options of `method` given on the command line (the rest keep the method's defaults). Options of
    other methods are dropped with a notice on stderr (process 0's), so that a typo in --method does not
    pass unseen. The method's resolved options are written back into args, for train_config.json."""
    given = {o.name: getattr(args, o.name) for o in _all_options() if getattr(args, o.name, None) is not None}
    own = {o.name for o in method.options}
    if (foreign := [n for n in given if n not in own]) and rank == 0:
        takes = ", ".join(o.cli for o in method.options) or "none"
        print(f"minicustom: {', '.join('--' + n.replace('_', '-') for n in foreign)} ignored: not an option of "
              f"method {method.name} (its options: {takes})", file=sys.stderr)
    for name in foreign:
        setattr(args, name, None)
    given = {k: v for k, v in given.items() if k in own}
    for name, value in {**method.defaults(), **given}.items():
        setattr(args, name, value)
    return given


def run_options(args, method: Method | None, given: dict, **extra) -> dict:
    """What a checkpoint records beside the TrainConfig: the model folder, the method and its options
    (None for DPO continuing an adapter, whose method is the adapter's)."""
    chosen = {"method": method.name, **method.defaults(), **given} if method else {"method": None}
    return {"model": str(model_path(args).resolve()), **chosen, **extra}


def attach(model, tok, method: Method, given: dict, seed: int):
    if isinstance(targets := given.get("targets"), list):  # names the user typed: each must name a layer
        def layer(name: str) -> bool:
            module = model.get_submodule(name)
            if method.targetable is not None:
                return method.targetable(module)
            return linear_like(module) or isinstance(module, torch.nn.Embedding)

        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n and layer(n)})
        if unknown := [t for t in targets if not any(layer(n) for n in find_targets(model, [t]))]:
            kind = "linear or embedding layer" if method.targetable is None else f"layer {method.name} adapts"
            others = "" if method.targetable else ", or all-linear"
            raise ValueError(f"--targets {','.join(targets)}: no {kind} of the model is named "
                             f"{', '.join(unknown)} (its layers: {', '.join(leaves)}{others})")
    torch.manual_seed(seed)  # the method's initialisation is part of the run
    apply_method(model, method.name, tokenizer=tok, **given)


def finish(args, model, rank: int, full: bool, tok=None):
    """Export the adapter (or the checkpoint), the tokenizer files of a full model and the command's options.
    After --new-tokens the extended base and tokenizer go to OUT/base, which the adapter names as its base."""
    out, base = Path(args.out), model_path(args)
    if getattr(args, "new_tokens", None):
        base = out / "base"
        if rank == 0:
            save_extended_base(model, tok, base, source=model_path(args))
    export(model, out, base_model_name_or_path=str(base))
    if rank == 0:
        if full:
            copy_tokenizer_files(model_path(args), out)
        write_json(out / "train_config.json", {k: v for k, v in vars(args).items() if k != "func"})
        print(out)
    if dist.is_initialized():
        dist.barrier()  # a process that tears gloo down while a peer still writes aborts ("terminate called")
        # Collect cyclic garbage (FSDP2's state keeps collective Work objects in cycles) while the group and
        # the interpreter are alive: one CI run saw gloo abort a process at exit, after a clean run.
        gc.collect()
        dist.destroy_process_group()


def start_adapter(args) -> str | None:
    """The adapter a preference or RL run continues (--adapter), taken off args: the model loads bare and
    the adapter is loaded trainable after the method options are read."""
    start, args.adapter = args.adapter, None
    if start and args.method:
        raise ValueError("--adapter continues that adapter's method; --method is for a new adapter, not both")
    return start


def named_reference(args, start: str | None, trainer: str, precomputed: bool = False) -> str:
    """--reference -> 'base' (the default for a new adapter), 'snapshot', 'precomputed' (where the trainer
    takes it) or a folder; a run starting from an adapter or from full fine-tuning must name it."""
    choices = "adapter-snapshot (that starting point, frozen), base (the model underneath, adapters disabled), " + \
        ("a checkpoint folder, or precomputed" if precomputed else "or a checkpoint folder")
    if args.reference is None and (start or args.method == "full"):
        raise ValueError(f"starting {trainer} from " + (f"the adapter {start}" if start else "a fully fine-tuned "
                         "model") + f" needs an explicit reference: --reference {choices}")
    reference = {None: "base", "adapter-snapshot": "snapshot"}.get(args.reference, args.reference)
    if not (reference in ("base", "snapshot") or reference == "precomputed" and precomputed
            or Path(reference).is_dir()):
        raise ValueError(f"--reference {args.reference}: not base, adapter-snapshot{', precomputed' * precomputed} "
                         "or a folder")
    return reference


def prepare_run(args, start: str | None, reference: str | None):
    """The opening the trainers that attach a new adapter or continue one share (dpo, kto, grpo, rloo,
    ppo): the run folder checked, torchrun joined, the method's options read, the model loaded. Returns
    (method or None, rank, the method's options given, report, model, tokenizer)."""
    method = None if start else get_method(args.method or "lora")
    folder = reference if reference not in (None, "base", "snapshot", "precomputed") else None
    check_run_folder(args.out, args.resume, model=model_path(args), adapter=start, reference=folder)
    rank = init_distributed(args)
    given = method_options(args, method, rank) if method else {}
    if given.get("new_tokens"):
        raise ValueError("--new-tokens is taken by train sft (which adds the tokens before reading the data); "
                         "train the new tokens with sft first, then continue from that adapter")
    report = print if rank == 0 else (lambda *a, **k: None)
    return (method, rank, given, report, *load_for_training(args))


def attach_or_continue(model, tok, start: str | None, method: Method | None, given: dict, seed: int):
    if start:
        load_adapter(model, start, is_trainable=True)
    else:
        attach(model, tok, method, given, seed)


def cmd_train_sft(args):
    """Load, attach the method, train, export; under torchrun each process runs this."""
    if args.adapter:
        raise ValueError("train sft starts a new adapter; --adapter is not taken (to continue a run, use --resume "
                         "with the same --out)")
    check_run_folder(args.out, args.resume, model=model_path(args))
    method = get_method(args.method)
    rank = init_distributed(args)
    given = method_options(args, method, rank)
    new_tokens = bool(given.get("new_tokens"))  # they change the tokenizer: attached before the data is read
    if new_tokens and not args.resume and (Path(args.out) / "base" / "config.json").exists():
        raise ValueError(f"--out {args.out}/base already holds a model; nothing was written: choose another --out")
    report = print if rank == 0 else (lambda *a, **k: None)
    config = TrainConfig(**train_options(args, method.lr), packing=not args.no_packing,
                         exact_match=args.exact_match, max_new_tokens=args.max_new_tokens,
                         router_aux_loss_coef=args.router_aux_loss_coef)
    model, tok = load_for_training(args)
    if new_tokens:
        attach(model, tok, method, given, args.seed)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, report=report, **data_options(args))
    examples = load_examples(args.data, **options)
    eval_examples = load_examples(args.eval_data, **options) if args.eval_data else None
    if not new_tokens:
        attach(model, tok, method, given, args.seed)
    train(model, examples, config, Path(args.out), eval_examples=eval_examples, tokenizer=tok,
          pad_id=pad_id_for(tok), resume=args.resume, stop_ids=default_stop_ids(model, tok), data_files=[args.data],
          options=run_options(args, method, given))
    finish(args, model, rank, full=not adapter_configs(model), tok=tok)


def cmd_train_dpo(args):
    """Load, attach a new adapter or load the starting one (trainable), pick the reference, train, export."""
    start = start_adapter(args)
    reference = named_reference(args, start, "DPO", precomputed=True)
    losses = args.loss.split(",")
    config = DPOConfig(**train_options(args, DPOConfig.lr), loss_type=losses if len(losses) > 1 else losses[0],
                       loss_weights=args.loss_weights, beta=args.beta, label_smoothing=args.label_smoothing,
                       rpo_alpha=args.rpo_alpha, simpo_gamma=args.simpo_gamma, discopop_tau=args.discopop_tau)
    method, rank, given, report, model, tok = prepare_run(args, start, reference)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, report=report, chat=args.chat_template)
    pairs = load_preferences(args.data, **options)
    eval_pairs = load_preferences(args.eval_data, **options) if args.eval_data else None
    attach_or_continue(model, tok, start, method, given, args.seed)
    cache = args.reference_cache or cache_root() / "reference-logps"
    train_dpo(model, pairs, config, Path(args.out), reference=reference, eval_pairs=eval_pairs,
              pad_id=pad_id_for(tok), resume=args.resume, reference_cache=cache, report=report,
              data_files=[args.data], options=run_options(args, method, given, reference=args.reference,
                                                          start=start))
    finish(args, model, rank, full=not adapter_configs(model))


def _all_options() -> list[Option]:
    """Every registered method's options, each name once (methods that share an option share its flag)."""
    return list({o.name: o for m in REGISTRY.values() for o in m.options}.values())


def _takers(option: Option) -> dict[str, object]:
    """method name -> its default, for the methods that take an option of this name."""
    return {m.name: o.default for m in REGISTRY.values() for o in m.options if o.name == option.name}


def _option_help(option: Option) -> str:
    """The option's help, its default (per method where they differ) and the methods that take it."""
    takers, groups = _takers(option), {}
    for name, default in takers.items():
        groups.setdefault(repr(default), (default, []))[1].append(name)
    said = [f"default {default}" + (f" for {', '.join(names)}" if len(groups) > 1 else "")
            for default, names in groups.values() if default is not None]
    return f"{option.help} ({'; '.join([*said, 'methods: ' + ', '.join(takers)])})".replace("%", "%%")


def add_method_options(p):
    """One argument group per set of methods sharing options (titled by those methods), each option once.
    Added last, so that a method registered from outside whose option takes a trainer's flag is named."""
    groups: dict[tuple, list[Option]] = {}
    for o in _all_options():
        groups.setdefault(tuple(_takers(o)), []).append(o)
    for takers, options in groups.items():
        group = p.add_argument_group(f"options of {', '.join(takers)}")
        for o in options:
            try:
                if o.flag:
                    group.add_argument(o.cli, dest=o.name, action="store_true", default=None, help=_option_help(o))
                else:
                    group.add_argument(o.cli, dest=o.name, type=o.type, choices=o.choices, help=_option_help(o))
            except argparse.ArgumentError:
                raise ValueError(f"method {takers[0]}: option {o.cli} is already a flag of the train command; "
                                 "rename the option") from None


def methods_epilog() -> str:
    """The registered methods, one a line, for the end of --help."""
    width = max(len(m.name) for m in REGISTRY.values()) + 2
    return "methods:\n" + "".join(f"  {m.name:<{width}}{m.help}\n" for m in REGISTRY.values())


def add_method_args(p, lr_help: str):
    """--method (the registry's names) and one argument group per method family, each option once."""
    p.add_argument("--method", choices=list(REGISTRY), metavar="METHOD",
                   help="the method to attach, one of those listed at the end (default: lora)")
    p.add_argument("--out", required=True, help="output folder: adapter (or checkpoint), metrics, checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest (refused when "
                   "the model, the data or the method differ; changed options are applied and printed)")
    p.add_argument("--lr", type=POSITIVE, help=lr_help)
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
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep only each block's input for "
                   "backward and recompute the block's activations there (less memory, about a third more time)")
    p.add_argument("--offload-activations", action="store_true", help="CUDA: keep the tensors saved for backward "
                   "in pinned CPU memory (with --gradient-checkpointing: the blocks' inputs)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
                   help="bf16/fp16: mixed precision (matmuls in 16 bits, trained weights, norms and the loss in "
                   "fp32; fp16 needs CUDA); auto: bf16 where the GPU or CPU runs it fast (AVX512-BF16 or AMX), "
                   "else fp32. The model must be loaded in float32")
    p.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw: torch's AdamW, fp32 moments (8 bytes per trained parameter); adamw8bit: the same "
                   "update with the moments stored as blockwise 8-bit codes (2 bytes, as bitsandbytes' AdamW8bit; "
                   "tensors under 4096 elements keep fp32 moments)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--log-every", type=COUNT, default=1)
    p.add_argument("--log", choices=["jsonl", "tensorboard"], default="jsonl",
                   help="metrics.jsonl always; tensorboard also writes them as TensorBoard scalars under OUT/tensorboard")
    p.add_argument("--eval-every", type=COUNT)
    p.add_argument("--save-every", type=COUNT0, help="checkpoint every N steps (default: a tenth of the run, at "
                   "most 100 steps; 0 = only at the end), and always at the end and on Ctrl-C")


def add_train_sft(sub):
    p = sub.add_parser("sft", help="supervised fine-tuning", epilog=methods_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--eval-data", help="held-out JSONL file: eval loss, perplexity and exact match")
    add_method_args(p, lr_help="peak learning rate (default: the method's own, e.g. 1e-3 for LoRA, 3e-5 for full)")
    p.add_argument("--batch-size", type=COUNT, default=4, help="rows per micro-batch (per process)")
    p.add_argument("--no-packing", action="store_true")
    p.add_argument("--exact-match", type=COUNT0, default=32, help="eval examples to answer for exact match")
    p.add_argument("--max-new-tokens", type=COUNT, default=64)
    p.add_argument("--router-aux-loss-coef", type=NONNEGATIVE, default=None,
                   help="Mixture-of-Experts models: weight of the routers' load-balancing loss (default: the config's "
                        "router_aux_loss_coef if it sets output_router_logits, as transformers; else 0)")
    add_method_options(p)
    p.set_defaults(func=cmd_train_sft, method="lora")


def add_train_dpo(sub):
    p = sub.add_parser("dpo", help="preference optimization: DPO and its family", epilog=methods_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
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
    add_method_args(p, lr_help=f"peak learning rate (default: {DPOConfig.lr}, whatever the method)")
    p.add_argument("--batch-size", type=COUNT, default=4, help="pairs per micro-batch (per process)")
    add_method_options(p)
    p.set_defaults(func=cmd_train_dpo)


