"""`minicustom train grpo | rloo | ppo`: online RL from a reward. Load the policy, attach a new adapter
(or continue one with --adapter), read the prompts, build the reward (scorers, module:function, a reward
model folder, weighted), name the reference, train, export the adapter as `train sft` does.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .argtypes import COUNT, COUNT0, FRACTION, NONNEGATIVE, POSITIVE, PROBABILITY, UNIT, checked, float_list
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
from .data import pad_id_for, read_jsonl
from .evaluate import SCORERS
from .losses import ADVANTAGE_SCALES, POLICY_LOSS_TYPES
from .methods import adapter_configs
from .prompting import default_stop_ids
from .rewards import RewardError, build_reward, check_answers
from .train.dpo import make_reference
from .train.ppo import PPOConfig, train_ppo
from .train.rl import RLConfig, check_group, train_rl
from .train.rollout import load_prompts


def _labels(path) -> list[str]:
    """The `label` scorer's choices: the answers the prompt file holds."""
    return sorted({r["answer"] for _, r in read_jsonl(path) if isinstance(r.get("answer"), str)})


def _reward(args, tok):
    try:
        return build_reward(args.reward, args.reward_weights, labels=_labels(args.data), tokenizer=tok,
                            device=args.device)
    except RewardError as e:
        raise RewardError(f"--reward: {e}") from None


def _config(args, kind: str):
    if args.max_new_tokens >= args.max_length:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in --max-length "
                         f"{args.max_length}")
    common = dict(**train_options(args, (PPOConfig if kind == "ppo" else RLConfig).lr),
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, epsilon=args.epsilon, epsilon_high=args.epsilon_high, beta=args.beta,
                  log_completions=args.log_completions)
    if kind == "ppo":
        return PPOConfig(**common, num_ppo_epochs=args.num_ppo_epochs, num_mini_batches=args.num_mini_batches,
                         gamma=args.gamma, lam=args.lam, vf_coef=args.vf_coef, cliprange_value=args.cliprange_value)
    config = RLConfig(**common, algorithm=kind, num_generations=args.num_generations,
                      num_iterations=args.num_iterations, loss_type=args.loss_type, scale=args.scale,
                      normalize_advantages=args.normalize_advantages, dynamic_sampling=args.dynamic_sampling)
    check_group(config)
    return config


def cmd_train_rl(args):
    """Check the options, load, attach (or continue) the adapter, read the prompts and build the reward,
    then train and export; under torchrun each process runs this."""
    kind = args.algorithm
    start = start_adapter(args)
    config = _config(args, kind)
    if config.beta == 0 and args.reference:
        raise ValueError(f"--reference {args.reference}: beta is 0, so no reference is used; give --beta, or leave "
                         "--reference out")
    reference = named_reference(args, start, kind.upper()) if config.beta else None
    if args.method == "full" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"train {kind} --method full under torchrun: sampling and evaluation run outside the sharded "
                         "(FSDP2) model; train an adapter, or run one process")
    method, rank, given, report, model, tok = prepare_run(args, start, reference)
    reward = _reward(args, tok)
    limit = config.max_length - config.max_new_tokens
    prompts = load_prompts(args.data, tok, limit, report)
    eval_prompts = load_prompts(args.eval_data, tok, limit, report) if args.eval_data else None
    check_answers(reward, [(p.source, p.record) for p in prompts + (eval_prompts or [])])
    attach_or_continue(model, tok, start, method, given, args.seed)
    live = make_reference(model, reference) if reference else None
    train = train_ppo if kind == "ppo" else train_rl
    train(model, prompts, config, Path(args.out), reward=reward, tokenizer=tok, stop_ids=default_stop_ids(model, tok),
          pad_id=pad_id_for(tok), reference=live, eval_prompts=eval_prompts, resume=args.resume,
          data_files=[args.data], options=run_options(args, method, given, reference=args.reference, start=start,
                                                      reward=args.reward, reward_weights=args.reward_weights))
    finish(args, model, rank, full=not adapter_configs(model))


def _add_common(p, kind: str):
    p.add_argument("--data", required=True, help="JSONL prompts: `prompt` (string or messages) or `messages` (a "
                   "trailing assistant turn is left out), plus what the reward reads (e.g. `answer`)")
    p.add_argument("--eval-data", help="held-out prompts, answered greedily: eval_reward (the accuracy, for a 0/1 "
                   "reward), at the start, every --eval-every steps and at the end")
    p.add_argument("--reward", required=True, help=f"where rewards come from, several separated by commas: a "
                   f"scorer of the record's `answer` ({', '.join(SCORERS)}), module:function, or a reward model "
                   "folder (minicustom train rm, or transformers' *ForSequenceClassification)")
    p.add_argument("--reward-weights", type=float_list, help="weights of the --reward sources (default: 1 each)")
    p.add_argument("--reference", help="the reference policy of the KL term: base (adapters disabled; the default "
                   "for a new adapter), adapter-snapshot (the starting adapter, frozen), or a checkpoint folder")
    p.add_argument("--beta", type=NONNEGATIVE, help="KL coefficient (default: " +
                   {"grpo": "0, no reference", "rloo": "0.05", "ppo": "0.05"}[kind] + ")")
    p.add_argument("--max-new-tokens", type=COUNT, default=64, help="the longest completion")
    p.add_argument("--temperature", type=POSITIVE, default=0.7 if kind == "ppo" else 1.0)
    p.add_argument("--top-p", type=PROBABILITY, default=1.0)
    p.add_argument("--top-k", type=COUNT)
    p.add_argument("--epsilon", type=UNIT, default=0.2, help="the ratio's clip, 1 - epsilon to 1 + epsilon")
    p.add_argument("--epsilon-high", type=POSITIVE, help="DAPO's clip-higher: the upper clip (default: --epsilon)")
    p.add_argument("--log-completions", type=checked(int, lambda v: v >= 0, ">= 0"), default=10,
                   help="print a rollout's first completions and rewards every N rollouts (0: never)")
    add_method_args(p, lr_help=f"peak learning rate (default: {RLConfig.lr})")
    p.add_argument("--batch-size", type=COUNT, default=8 if kind != "ppo" else 4,
                   help="completions per micro-batch (per process)")


def add_train_rl(sub):
    """train grpo, train rloo and train ppo."""
    helps = {"grpo": "GRPO and its variants (Dr. GRPO, DAPO): group-relative advantages, no critic",
             "rloo": "RLOO: leave-one-out baselines, no critic",
             "ppo": "PPO (InstructGPT): value head, GAE, KL-penalized reward from a reward model"}
    for kind, text in helps.items():
        p = sub.add_parser(kind, help=text, epilog=methods_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_args(p)
        _add_common(p, kind)
        if kind == "ppo":
            p.add_argument("--num-ppo-epochs", type=COUNT, default=4, help="passes over each rollout")
            p.add_argument("--num-mini-batches", type=COUNT, default=1, help="optimizer steps per pass")
            p.add_argument("--gamma", type=FRACTION, default=1.0)
            p.add_argument("--lam", type=FRACTION, default=0.95)
            p.add_argument("--vf-coef", type=NONNEGATIVE, default=0.1, help="the value loss's weight")
            p.add_argument("--cliprange-value", type=POSITIVE, default=0.2)
        else:
            p.add_argument("--num-generations", type=COUNT, default=4, help="completions per prompt (G); must divide "
                           "batch-size x grad-accum x processes")
            p.add_argument("--num-iterations", type=COUNT, default=1, help="optimizer steps per rollout")
            p.add_argument("--dynamic-sampling", type=COUNT0, default=0, metavar="ROUNDS",
                           help="DAPO's dynamic sampling: up to ROUNDS draws of fresh prompts replace the groups "
                           "whose rewards are all equal (default 0: off)")
        if kind == "grpo":
            p.add_argument("--loss-type", choices=POLICY_LOSS_TYPES, default="grpo", help="token aggregation")
            p.add_argument("--scale", choices=ADVANTAGE_SCALES, default="group",
                           help="the advantages' divisor: group std, batch std, or none (Dr. GRPO)")
        if kind == "rloo":
            p.add_argument("--normalize-advantages", action="store_true", help="whiten each rollout's advantages")
        add_method_options(p)
        p.set_defaults(func=cmd_train_rl, algorithm=kind, loss_type="grpo", scale="group", normalize_advantages=False)
