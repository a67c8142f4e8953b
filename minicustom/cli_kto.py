"""`minicustom train kto`: KTO on unpaired thumbs-up / thumbs-down records (or preference pairs, split in
two), with a named reference, as `train dpo` takes it: load the model, attach a registered method (or
continue an adapter), train (train/kto.py), export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .argtypes import NONNEGATIVE, POSITIVE, checked
from .cli_common import add_model_args
from .cli_train import (
    add_method_args,
    add_method_options,
    attach_or_continue,
    finish,
    methods_epilog,
    named_reference,
    prepare_run,
    run_options,
    start_adapter,
    train_options,
)
from .data import load_preferences, pad_id_for
from .methods import adapter_configs
from .train.kto import KTOConfig, feedback_format, load_unpaired, train_kto


def cmd_train_kto(args):
    """Load, attach a new adapter or load the starting one (trainable), pick the reference, train, export."""
    start = start_adapter(args)
    if args.reference == "precomputed":
        raise ValueError("--reference precomputed: KTO's KL rows change with every shuffled batch, so their "
                         "reference log-probs cannot be computed once; use base, adapter-snapshot or a folder")
    reference = named_reference(args, start, "KTO")
    config = KTOConfig(**train_options(args, KTOConfig.lr), beta=args.beta, desirable_weight=args.desirable_weight,
                       undesirable_weight=args.undesirable_weight)
    method, rank, given, report, model, tok = prepare_run(args, start, reference)
    options = dict(tokenizer=tok, max_length=config.max_length, truncation=args.truncation,
                   vocab_size=model.config.vocab_size, report=report, chat=args.chat_template)
    examples = load_unpaired(args.data, **options)
    eval_examples = eval_pairs = None
    if args.eval_data and feedback_format(args.eval_data) == "paired":
        eval_pairs = load_preferences(args.eval_data, **options)
    elif args.eval_data:
        eval_examples = load_unpaired(args.eval_data, **options)
    attach_or_continue(model, tok, start, method, given, args.seed)
    train_kto(model, examples, config, Path(args.out), reference=reference, eval_examples=eval_examples,
              eval_pairs=eval_pairs, pad_id=pad_id_for(tok), resume=args.resume, data_files=[args.data],
              options=run_options(args, method, given, reference=args.reference, start=start))
    finish(args, model, rank, full=not adapter_configs(model))


def add_train_kto(sub):
    p = sub.add_parser("kto", help="KTO: alignment from unpaired desirable / undesirable completions",
                       epilog=methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(adapter=None)
    p.add_argument("--data", required=True, help="JSONL records prompt/completion/label (label true or false; "
                   "strings or message lists), or preference pairs prompt/chosen/rejected, each split into a "
                   "desirable and an undesirable record")
    p.add_argument("--chat-template", action="store_true",
                   help="render string prompts and completions through the tokenizer's chat template")
    p.add_argument("--eval-data", help="held-out records: eval loss, KL and rewards; preference pairs also give "
                   "the preference accuracy (eval_rewards/accuracies, eval_policy_accuracy)")
    p.add_argument("--reference", help="the reference policy: base (adapters disabled; the default for a new "
                   "adapter), adapter-snapshot (the starting adapter, frozen) or a checkpoint folder. Required "
                   "with --adapter or --method full")
    p.add_argument("--beta", type=POSITIVE, default=0.1, help="KTO's beta (> 0)")
    p.add_argument("--desirable-weight", type=NONNEGATIVE, default=1.0, help="weight w_d of the desirable losses")
    p.add_argument("--undesirable-weight", type=NONNEGATIVE, default=1.0,
                   help="weight w_u of the undesirable losses")
    add_method_args(p, lr_help=f"peak learning rate (default: {KTOConfig.lr}, whatever the method)")
    p.add_argument("--batch-size", type=checked(int, lambda v: v >= 2, ">= 2"), default=4,
                   help="examples per micro-batch (per process); at least 2, for the KL estimate's mismatched rows")
    add_method_options(p)
    p.set_defaults(func=cmd_train_kto)
