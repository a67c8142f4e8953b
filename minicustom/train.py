"""The training loop: supervised fine-tuning with any method, one process or many (torchrun).

    step s:  N = trained tokens in all k micro-batches of all processes (known before any forward)
             for each micro-batch m:  (sum of CE over m's trained tokens * world / N).backward()
             clip, AdamW, lr from warmup + cosine/linear
So the gradient is that of the mean over every trained token of the global batch, however it is split
into micro-batches and processes (averaging per micro-batch would weigh a token of a short example more
than one of a long one). The method is applied to the model before `train` is called (see METHODS);
the loop only sees parameters that require grad.

Data order is a function of (seed, epoch) and a checkpoint (run_state.py) holds the trainable tensors,
the optimizer state, the RNG state, the step and a record of the run (options, base model, data), written
to a temporary folder that is renamed when complete, by default every tenth of the run and at the end; a
killed or Ctrl-C'd run resumes onto the same loss curve, and a resume with another model or other data is
refused. Several processes: DDP for adapters (only the trainable tensors are all-reduced), FSDP2
(`fully_shard` per block) for full fine-tuning; gloo on CPU, nccl on CUDA.
Left out: mixed-precision autocast, tensor/pipeline parallelism, sequence parallelism.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .data import IGNORE, Example, collate, pack
from .files import atomic_write
from .losses import sft_loss
from .run_state import (  # noqa: F401  (Interrupted, Progress, TrainingError: train's names too)
    Interrupted,
    Progress,
    StopRequest,
    TrainingError,
    compare_runs,
    default_save_every,
    examples_digest,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_metrics,
    read_state,
    remove_partial_saves,
    run_record,
    save_checkpoint,
)


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lora_plus_ratio: float | None = None  # LoRA+: lora_B learns this many times faster
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4  # rows per micro-batch per process (packed rows hold several examples)
    grad_accum: int = 1
    max_length: int = 1024
    packing: bool = True
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None  # and at the end, when eval data is given
    save_every: int | None = None  # None: run_state.default_save_every (a tenth of the run); 0: at the end only
    keep_checkpoints: int = 2
    exact_match: int = 32  # eval examples to answer greedily for exact match (0: none)
    max_new_tokens: int = 64
    loss_chunk: int = 512

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
        checks = {  # name -> (holds, what it must be)
            "lr": (finite(self.lr) and self.lr > 0, "> 0 and finite"),
            "weight_decay": (finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            "max_grad_norm": (self.max_grad_norm is None or finite(self.max_grad_norm) and self.max_grad_norm > 0,
                              "> 0, or None for no clipping"),
            "lora_plus_ratio": (self.lora_plus_ratio is None or finite(self.lora_plus_ratio)
                                and self.lora_plus_ratio > 0, "> 0, or None"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "epochs": (finite(self.epochs) and self.epochs > 0, "> 0"),
            "max_steps": (self.max_steps is None or self.max_steps >= 1, ">= 1, or None (epochs)"),
            "eval_every": (self.eval_every is None or self.eval_every >= 1, ">= 1, or None"),
            "save_every": (self.save_every is None or self.save_every >= 0, ">= 0, or None"),
            "exact_match": (self.exact_match >= 0, ">= 0"),
            "betas": (len(self.betas) == 2 and all(finite(b) and 0 <= b < 1 for b in self.betas), "two in [0, 1)"),
            **{name: (getattr(self, name) >= 1, ">= 1") for name in ("batch_size", "grad_accum", "max_length",
                                                                        "log_every", "max_new_tokens", "loss_chunk")},
        }
        for name, (holds, expected) in checks.items():
            if not holds:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")
        self.betas = tuple(self.betas)


def lr_factor(step: int, total: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine or linear decay to 0."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, norms, DoRA magnitudes or embeddings);
    with lora_plus_ratio, lora_B at lr * ratio."""
    from .lora import lora_plus_param_groups

    if config.lora_plus_ratio:
        return lora_plus_param_groups(model, config.lr, config.lora_plus_ratio, config.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


class SFTLoss(nn.Module):
    """model + loss as one module, so that DDP and FSDP2 see the whole step in a forward call."""

    def __init__(self, model: nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids, labels, seq_ids=None, attention_mask=None):
        h = self.model.forward_hidden(input_ids, seq_ids=seq_ids, attention_mask=attention_mask)  # (B, T, C)
        return sft_loss(h, labels, self.model.lm_head, self.chunk)[0], {}


class SFTTask:
    """What the loop needs to know of its objective, for SFT: the rows (packed examples), a micro-batch of
    rows, its weight (trained tokens: the loss of a step is a sum over them divided by their count), the
    loss module, and the eval metrics. The DPO task (dpo.py) answers the same questions for pairs."""

    weight_name = "trained_tokens"

    def __init__(self, examples: list[Example], config: TrainConfig, pad_id: int, eval_examples=None,
                 tokenizer=None, stop_ids=()):
        self.examples, self.config, self.pad_id = examples, config, pad_id
        self.eval_items, self.tokenizer, self.stop_ids = eval_examples or [], tokenizer, stop_ids
        self.units = make_units(examples, config)

    def batch(self, unit_ids: list[int], filler: bool = False) -> dict:
        batch = collate([[self.examples[i] for i in self.units[u]] for u in unit_ids], self.pad_id)
        if filler:  # an empty share of a distributed step: a forward and backward that contribute nothing
            batch["labels"].fill_(IGNORE)
        return batch

    def eval_batch(self, items: list[Example], filler: bool = False) -> dict:
        batch = collate([[e] for e in items], self.pad_id)
        if filler:
            batch["labels"].fill_(IGNORE)
        return batch

    @staticmethod
    def weight(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_module(self, model: nn.Module) -> nn.Module:
        return SFTLoss(model, self.config.loss_chunk)

    def data_digest(self) -> str:
        return examples_digest(self.examples)

    def eval_metrics(self, loss_sum: float, weight: int, stats: dict) -> dict:
        return _loss_metrics(loss_sum, weight)

    def answer_metrics(self, model) -> dict:
        """Greedy exact match on the first `exact_match` eval examples (needs the tokenizer)."""
        if self.tokenizer is None or not self.config.exact_match:
            return {}
        return {"exact_match": exact_match(model, self.eval_items, self.config, self.pad_id, self.tokenizer,
                                           self.stop_ids)}


# -- data order ---------------------------------------------------------------------------------------

def make_units(examples: list[Example], config: TrainConfig) -> list[list[int]]:
    """The rows of training: bins of packed examples, or single examples."""
    if config.packing:
        return pack([len(e) for e in examples], config.max_length)
    return [[i] for i in range(len(examples))]


def epoch_steps(n_units: int, epoch: int, config: TrainConfig, world: int) -> list[list[int]]:
    """The unit indices of each optimizer step of an epoch, in a seeded order (the last may be short)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(n_units, generator=g).tolist()
    per_step = config.batch_size * config.grad_accum * world
    return [order[i:i + per_step] for i in range(0, n_units, per_step)]


def micro_batches(step_units: list[int], config: TrainConfig, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of a step: micro-batch m of process r holds rows
    (m * world + r) * batch_size ..., so one process with batch_size * world sees the same rows. In a
    short last step, a process may get empty micro-batches: alone it skips them; with others it keeps
    them (every process must run as many forwards), and they are run on a fully masked row."""
    B = config.batch_size
    out = [step_units[(m * world + rank) * B:(m * world + rank + 1) * B] for m in range(config.grad_accum)]
    return [m for m in out if m] if world == 1 else out


def step_batches(task, step_units: list[int], config: TrainConfig, rank: int, world: int) -> list[dict]:
    """The collated micro-batches of this process for one step (an empty share: a filler that counts nothing)."""
    return [task.batch(m or step_units[:1], filler=not m) for m in micro_batches(step_units, config, rank, world)]


# -- evaluation ---------------------------------------------------------------------------------------

def _loss_metrics(total: float, n: int) -> dict:
    """Mean loss per trained token and its perplexity (capped at e^50 so that a diverged run still logs)."""
    loss = total / max(n, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def exact_match(model, examples: list[Example], config: TrainConfig, pad_id: int, tokenizer, stop_ids=()) -> float:
    """Greedy exact match on the first `config.exact_match` examples: the generated answer, stripped,
    equals the reference, stripped."""
    from .generate import generate

    was_training = model.training
    model.eval()
    chosen = [e for e in examples if e.answer_start > 0][:config.exact_match]
    hits = 0
    for i in range(0, len(chosen), config.batch_size):
        part = chosen[i:i + config.batch_size]
        prompts = [e.input_ids[:e.answer_start] for e in part]
        T = max(len(p) for p in prompts)  # prompts are left-padded to T; new tokens follow
        room = model.config.max_position_embeddings - T  # a prompt near the context leaves fewer new tokens
        out = generate(model, prompts, max(1, min(config.max_new_tokens, room)), stop=list(stop_ids),
                       pad_token_id=pad_id)
        for e, row in zip(part, out[:, T:].tolist()):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            reference = tokenizer.decode([y for y in e.labels[e.answer_start:] if y != IGNORE],
                                         skip_special_tokens=True)
            hits += answer.strip() == reference.strip()
    model.train(was_training)
    return hits / max(len(chosen), 1)


def evaluate(model: nn.Module, examples: list[Example], config: TrainConfig, pad_id: int, tokenizer=None,
             stop_ids=()) -> dict:
    """Token-weighted eval loss and perplexity; with a tokenizer, greedy exact match (see exact_match)."""
    task = SFTTask([], config, pad_id, examples, tokenizer, stop_ids)
    return evaluate_objective(task, model, task.loss_module(model), full=False)


@torch.no_grad()
def evaluate_objective(task, model: nn.Module, wrapper: nn.Module, full: bool) -> dict:
    """The task's eval metrics over every process's share of its eval items (all take part: FSDP's sharded
    forward needs each of them), then its answer metrics (greedy generation) on process 0 alone, except
    under FSDP."""
    rank, world = _world()
    config = task.config
    share = task.eval_items[rank::world]
    was_training = model.training
    wrapper.eval()
    loss_sum, weight, stats = 0.0, 0, {}
    for i in range(0, max(len(task.eval_items[0::world]), 1), config.batch_size):
        part = share[i:i + config.batch_size]
        batch = task.eval_batch(part or task.eval_items[:1], filler=not part)  # every process runs as many
        s, st = wrapper(**batch)
        loss_sum, weight = loss_sum + float(s), weight + task.weight(batch)
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + float(v)
    wrapper.train(was_training)
    if world > 1:
        sums = torch.tensor([loss_sum, weight, *stats.values()], dtype=torch.float64)
        dist.all_reduce(sums)
        loss_sum, weight = float(sums[0]), int(sums[1])
        stats = dict(zip(stats, sums[2:].tolist()))
    metrics = task.eval_metrics(loss_sum, weight, stats)
    if world == 1 or (rank == 0 and not full):
        metrics.update(task.answer_metrics(model))
    return metrics


# -- the loop -----------------------------------------------------------------------------------------

def accumulate_gradients(wrapper: nn.Module, micros: list[dict], device, world: int = 1,
                         weight: Callable[[dict], int] = SFTTask.weight) -> tuple[float, int, int, dict]:
    """Backward over the micro-batches of one step (this process's share); returns (mean loss per unit of
    weight over all processes, total weight, tokens, the wrapper's statistics summed and divided by the
    weight). The weight is the trained tokens for SFT, the pairs for DPO: each micro-batch's summed loss
    is divided by the step's total weight, so the gradients are those of one batch holding them all."""
    counts = torch.tensor([sum(weight(b) for b in micros), sum(b["input_ids"].numel() for b in micros)],
                          dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
    n_weight, n_tokens = int(counts[0]), int(counts[1])
    loss_sum, stats = torch.zeros((), dtype=torch.float64), {}
    for m, batch in enumerate(micros):
        batch = {k: v.to(device) for k, v in batch.items()}
        last = m == len(micros) - 1
        with wrapper.no_sync() if hasattr(wrapper, "no_sync") and not last else contextlib.nullcontext():
            s, st = wrapper(**batch)
            (s * (world / max(n_weight, 1))).backward()
        loss_sum += s.detach().double().cpu()
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v.detach().double().cpu()
    sums = torch.stack([loss_sum, *stats.values()])
    if world > 1:
        dist.all_reduce(sums)
    means = (sums / max(n_weight, 1)).tolist()
    return means[0], n_weight, n_tokens, dict(zip(stats, means[1:]))


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _wrap(model: nn.Module, wrapper: nn.Module, full: bool) -> nn.Module:
    if not dist.is_initialized():
        return wrapper
    if full:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(wrapper)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(wrapper)


def train(model: nn.Module, examples: list[Example], config: TrainConfig, out: str | Path, *,
          eval_examples: list[Example] | None = None, tokenizer=None, pad_id: int = 0, resume: bool = False,
          stop_ids=(), on_step: Callable[[int, dict], None] | None = None, data_files=None,
          options: dict | None = None) -> list[dict]:
    """Train the parameters of `model` that require grad on `examples`; returns the logged metrics.

    out/ receives metrics.jsonl, loss.png and checkpoints/: every save_every steps (None: a tenth of the
    run, at most 100 steps; 0: none) and at the end. Each records the run (see run_state): resume=True
    continues from out/checkpoints/latest, refusing another base model, other examples or another method,
    and applies and prints any changed TrainConfig field. data_files (the files the examples came from)
    and options (the method and its options, say) are recorded too. Ctrl-C stops at the next step
    boundary, saves a checkpoint and raises run_state.Interrupted (a KeyboardInterrupt). A non-finite loss
    stops the run with a TrainingError before the optimizer touches the weights; the last checkpoint
    stays as it was."""
    task = SFTTask(examples, config, pad_id, eval_examples, tokenizer, stop_ids)
    return run(task, model, out, resume=resume, on_step=on_step, data_files=data_files, options=options)


def run(task, model: nn.Module, out: str | Path, *, resume: bool = False,
        on_step: Callable[[int, dict], None] | None = None, data_files=None, options: dict | None = None
        ) -> list[dict]:
    """The loop, for any task (SFTTask here, DPOTask in dpo.py): see train()."""
    from .plot import write_loss_png

    config = task.config
    out = Path(out)
    rank, world = _world()
    folder = out / "checkpoints"
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("no parameter requires grad: apply a method (e.g. apply_lora) first")
    full = all(p.requires_grad for p in model.parameters())
    per_epoch = len(epoch_steps(len(task.units), 0, config, world))
    if per_epoch == 0:
        raise TrainingError(f"{len(task.units)} rows cannot fill one step of {config.batch_size} rows x "
                            f"{config.grad_accum} micro-batches x {world} processes")
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    latest = latest_checkpoint(out, resume)
    identity = run_record(model, config, task.data_digest(), data_files, options)  # before FSDP shards it
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    saved = read_state(latest) if latest else {"step": 0}
    changes = compare_runs(saved.get("run"), identity, latest) if latest else []
    metrics_path = out / "metrics.jsonl"
    history = read_metrics(metrics_path, saved["step"], say) if latest else []

    torch.manual_seed(config.seed)
    model.train()
    model.gradient_checkpointing = config.gradient_checkpointing
    wrapper = _wrap(model, task.loss_module(model), full)
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=config.betas)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(folder, say)
    step = 0
    if latest:
        step = load_checkpoint(latest, wrapper, optimizer)
        for group, fresh in zip(optimizer.param_groups, param_groups(model, config)):  # this run's options
            group.update(peak_lr=fresh.get("lr", config.lr), weight_decay=fresh["weight_decay"], betas=config.betas)
        for change in changes:
            say(f"resume: {change}")
        say(f"resuming from {latest} (step {step} of {total})")
    if step == 0 and task.eval_items:  # the starting point, for comparison
        history = [{"step": 0, **evaluate_objective(task, model, wrapper, full)}]
    if rank == 0:
        atomic_write(metrics_path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in history)))

    def save():
        save_checkpoint(folder, wrapper, optimizer, step, rank, identity)
        if rank == 0:
            prune_checkpoints(folder, config.keep_checkpoints)
            write_loss_png(out / "loss.png", {
                "train": [(r["step"], r["loss"]) for r in history if "loss" in r],
                "eval": [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]})

    device = next(p for p in model.parameters() if p.requires_grad).device
    progress = Progress(total, step, enabled=rank == 0)
    every = default_save_every(total) if config.save_every is None else config.save_every
    plan_epoch, plan = -1, []
    with StopRequest() as stop:
        while step < total:
            epoch, index = divmod(step, per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_steps(len(task.units), epoch, config, world), epoch
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * lr_factor(step, total, config)
            micros = step_batches(task, plan[index], config, rank, world)
            loss, n_weight, n_tokens, stats = accumulate_gradients(wrapper, micros, device, world, task.weight)
            grad_norm = _clip(model, config.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                kept = (folder / (folder / "latest").read_text().strip() if (folder / "latest").exists()
                        else "none yet")
                raise TrainingError(f"the loss is {loss} (gradient norm {grad_norm}) at step {step + 1}; the "
                                    f"weights were not updated. Last good checkpoint: {kept}. Lower the "
                                    "learning rate, check the data, or train in float32.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            record = {"step": step, "epoch": round(step / per_epoch, 4), "loss": loss, **stats,
                      "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, task.weight_name: n_weight,
                      "tokens": n_tokens, "tokens_per_s": n_tokens / seconds}
            last = step == total
            if task.eval_items and ((config.eval_every and step % config.eval_every == 0) or last):
                record.update(evaluate_objective(task, model, wrapper, full))
            history.append(record)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if step % config.log_every == 0 or last or "eval_loss" in record:
                    extra = f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                    progress.update(step, f"loss {loss:.4f}{extra} lr {record['lr']:.2e} | "
                                         f"{record['tokens_per_s']:,.0f} tok/s")
            saved = (every and step % every == 0) or last
            if saved:
                save()
            if on_step is not None:
                on_step(step, record)
            if not last and stop.agreed(world, device):  # after the step: its checkpoint is a regular one
                if not saved:
                    save()
                progress.close()
                raise Interrupted(f"interrupted at step {step} of {total}; the run is saved in "
                                  f"{folder / f'checkpoint-{step:06d}'}")
    progress.close()
    return history


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# -- methods and export -------------------------------------------------------------------------------

def _full(model: nn.Module, **_):
    from .qlora import Linear4bit

    if any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError("full fine-tuning updates every weight, but this model's linears are 4-bit and frozen; "
                         "train an adapter on them (--method qlora or lora), or load the model unquantized")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _lora(**fixed):
    def attach(model, r=8, alpha=16.0, dropout=0.0, targets=None, **_):
        from .lora import apply_lora

        return apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets or "all-linear", **fixed)
    return attach


def _qlora(model, targets=None, **hyperparameters):
    """QLoRA: every linear but lm_head to NF4 (unless the model was loaded 4-bit), then LoRA on the targets."""
    from .qlora import Linear4bit, quantize_model

    if not any(isinstance(m, Linear4bit) for m in model.modules()):
        quantize_model(model)
    return _lora()(model, targets=targets, **hyperparameters)


def _loftq(model, r=8, alpha=16.0, dropout=0.0, targets=None, **_):
    from .qlora import apply_loftq

    return apply_loftq(model, r=r, alpha=alpha, targets=targets or "all-linear", dropout=dropout)


def _ia3(model, targets=None, **_):
    from .ia3 import apply_ia3

    return apply_ia3(model, targets=targets)


def _adapter(model, reduction_factor=16, placement="houlsby", dropout=0.0, **_):
    from .adapter import apply_adapters

    return apply_adapters(model, reduction_factor=reduction_factor, placement=placement, dropout=dropout)


def _llama_adapter(model, adapter_len=10, adapter_layers=None, **_):
    from .llama_adapter import apply_llama_adapter

    if adapter_layers is None:  # the paper's top 8 layers, or every layer of a smaller model
        adapter_layers = min(8, model.config.num_hidden_layers)
    return apply_llama_adapter(model, adapter_len=adapter_len, adapter_layers=adapter_layers)


def _prefix(model, num_virtual_tokens=20, prefix_projection=False, **_):
    from .prefix import apply_prefix

    return apply_prefix(model, num_virtual_tokens=num_virtual_tokens, projection=prefix_projection)


def _prompt(model, num_virtual_tokens=20, prompt_init="random", prompt_init_text=None, tokenizer=None, **_):
    from .prompt import apply_prompt_tuning

    return apply_prompt_tuning(model, num_virtual_tokens=num_virtual_tokens, init=prompt_init,
                               init_text=prompt_init_text, tokenizer=tokenizer)


def _ptuning(model, num_virtual_tokens=20, encoder="mlp", **_):
    from .prompt import apply_p_tuning

    return apply_p_tuning(model, num_virtual_tokens=num_virtual_tokens, encoder=encoder)


# method name -> attach(model, **hyperparameters); each later method adds its line here.
METHODS: dict[str, Callable] = {
    "full": _full,
    "lora": _lora(),
    "rslora": _lora(use_rslora=True),
    "dora": _lora(use_dora=True),
    "pissa": _lora(init="pissa"),
    "olora": _lora(init="olora"),
    "qlora": _qlora,
    "qlora-loftq": _loftq,
    "ia3": _ia3,
    "adapter": _adapter,
    "llama-adapter": _llama_adapter,
    "prefix": _prefix,
    "prompt": _prompt,
    "ptuning": _ptuning,
}


def apply_method(model: nn.Module, method: str, **hyperparameters) -> nn.Module:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method](model, **hyperparameters)


def export(model: nn.Module, out: str | Path, base_model_name_or_path: str | None = None):
    """The result of a run: a PEFT-style adapter folder, or (full fine-tuning) a checkpoint folder.
    Under FSDP2 every process must call it (the full weights are gathered); process 0 writes."""
    from .adapters_io import save_adapter
    from .checkpoint import save_model

    rank, _ = _world()
    if getattr(model, "adapter_configs", None):
        if rank == 0:
            save_adapter(model, out, base_model_name_or_path=base_model_name_or_path)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=dist.is_initialized()))
    if rank == 0:
        save_model(model, out, state=state)
