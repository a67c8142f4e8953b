"""`minicustom train rm`: train a reward model on preference pairs and write it as a transformers
sequence-classification folder (num_labels 1), the methods' adapters merged into it.

--model is a causal LM (a new score head is drawn on its decoder) or a reward-model folder (its head and
weights are trained further). The output folder is the merged checkpoint, its tokenizer files,
train_config.json, metrics.jsonl and checkpoints/ (for --resume). One process: under torchrun the
export would need the sharded weights gathered (train/export.py's), which is not wired here yet.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .argtypes import COUNT, NONNEGATIVE
from .checkpoint import copy_tokenizer_files, load_model
from .cli_common import DTYPES, add_model_args, check_run_folder, model_path
from .cli_train import (
    add_method_args,
    add_method_options,
    check_vocab,
    method_options,
    methods_epilog,
    train_options,
)
from .data import load_preferences, pad_id_for
from .files import read_json, write_json
from .methods.registry import apply_method, get_method
from .reward_model import RewardModel, load_reward_model, save_reward_model
from .tokenizer import load_tokenizer
from .train.rm import RMConfig, pair_margins, train_rm


def is_reward_model_folder(path) -> bool:
    """Whether config.json names a *ForSequenceClassification (load_reward_model then checks the rest)."""
    file = Path(path) / "config.json"
    arch = read_json(file).get("architectures") if file.is_file() else None
    return isinstance(arch, list) and any(str(a).endswith("ForSequenceClassification") for a in arch)


def start_model(args, pad_id: int) -> RewardModel:
    """The reward model to train: the folder's own, or a causal LM's decoder with a new head (drawn after
    seeding with --seed, so the run is repeatable)."""
    path, dtype = model_path(args), DTYPES[args.dtype]
    if is_reward_model_folder(path):
        return load_reward_model(path, dtype=dtype, device=args.device, quantize=args.quantize)
    lm = load_model(path, dtype=dtype, device=args.device, quantize=args.quantize)
    torch.manual_seed(args.seed)
    return RewardModel.from_causal_lm(lm, pad_token_id=lm.config.pad_token_id if lm.config.pad_token_id is not None
                                      and lm.config.pad_token_id >= 0 else pad_id)


def cmd_train_rm(args):
    """Check, load, attach the method, train, write the merged reward model."""
    if args.adapter:
        raise ValueError("train rm starts from a model folder; --adapter is not taken (fold the adapter in first "
                         "with `minicustom merge`)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train rm runs in one process; torchrun is not supported for it yet")
    method = get_method(args.method)
    if not method.mergeable and method.peft_type is not None:
        raise ValueError(f"--method {method.name}: its adapters cannot be merged into the weights, and a reward "
                         "model is written as one merged checkpoint folder; choose a mergeable method (lora, ia3, "
                         "qlora, full, ...)")
    check_run_folder(args.out, args.resume, model=model_path(args))
    config = RMConfig(**train_options(args, method.lr), center_rewards_coefficient=args.center_rewards_coefficient)
    given = method_options(args, method, 0)
    if given.get("new_tokens"):
        raise ValueError("--new-tokens is taken by train sft (which adds the tokens before reading the data and "
                         "saves the extended tokenizer); a reward model starts from a model that has them")
    tok = load_tokenizer(model_path(args))
    model = start_model(args, pad_id_for(tok))
    check_vocab(tok, model)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, chat=args.chat_template)
    pairs = load_preferences(args.data, **options)
    eval_pairs = load_preferences(args.eval_data, **options) if args.eval_data else None
    torch.manual_seed(args.seed)  # the method's initialisation is part of the run
    apply_method(model, method.name, tokenizer=tok, **given)
    record = {"model": str(model_path(args).resolve()), "method": method.name, **method.defaults(), **given}
    train_rm(model, pairs, config, Path(args.out), eval_pairs=eval_pairs, resume=args.resume,
             margins=pair_margins(args.data, pairs),
             eval_margins=pair_margins(args.eval_data, eval_pairs) if eval_pairs else None,
             data_files=[args.data], options=record)
    out = Path(args.out)
    save_reward_model(model, out)
    copy_tokenizer_files(model_path(args), out)
    write_json(out / "train_config.json", {k: v for k, v in vars(args).items() if k != "func"})
    print(out)


def add_train_rm(sub):
    p = sub.add_parser("rm", help="reward model: Bradley–Terry on preference pairs", epilog=methods_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL preference pairs (as train dpo reads them), with an "
                   "optional numeric 'margin' per record")
    p.add_argument("--chat-template", action="store_true",
                   help="render string prompt/chosen/rejected through the tokenizer's chat template")
    p.add_argument("--eval-data", help="held-out pairs: eval loss, accuracy, margin, reward mean and std")
    p.add_argument("--center-rewards-coefficient", type=NONNEGATIVE,
                   help="add C * mean((r_w + r_l)^2) to the loss, keeping rewards centred (TRL's option)")
    add_method_args(p, lr_help="peak learning rate (default: the method's own, e.g. 1e-3 for LoRA, 3e-5 for full)")
    p.add_argument("--batch-size", type=COUNT, default=4, help="pairs per micro-batch")
    add_method_options(p)
    p.set_defaults(func=cmd_train_rm, method="lora")
