"""The training loop shared by every objective (SFT, DPO, and the RL trainers to come), one process or
many (torchrun).

    step s:  N = the step's weight (trained tokens for SFT, pairs for DPO) over all k micro-batches of all
             processes, known before any forward
             for each micro-batch m:  (m's summed loss * world / N).backward()
             clip, AdamW (fp32 or 8-bit state: adamw8bit.py), lr from warmup + cosine/linear
So the gradient is that of the mean over the whole global batch, however it is split into micro-batches
and processes (averaging per micro-batch would weigh a token of a short example more than one of a long
one). What is trained comes from the objective, a `Task` (task.py); the method is applied to the model
before (methods/registry.py); the loop only sees parameters that require grad.

Data order is a function of (seed, epoch), and a checkpoint (state.py) holds the trainable tensors, the
optimizer state, the RNG state, the step and a record of the run (options, base model, data), written to a
temporary folder that is renamed when complete, by default every tenth of the run and at the end; a
killed or Ctrl-C'd run resumes onto the same loss curve, and a resume with another model or other data is
refused. Several processes: DDP for adapters (only the trainable tensors are all-reduced), FSDP2
(`fully_shard` per block) for full fine-tuning; gloo on CPU, nccl on CUDA.
Mixed precision (precision.py): with precision bf16 (or fp16 on CUDA) the whole run, evaluation and
rollouts included, is under autocast, the frozen base stored in bf16 where that is exact and put back at
the end; fp16 scales the loss (GradScaler) and skips a step whose gradients overflowed.
A method with a training-time rule of its own (AdaLoRA: a regularizer on the loss, a rank allocation after
each optimizer step, state kept in checkpoints) joins through its adapter config's hooks (method_hooks).
Left out: tensor/pipeline parallelism, sequence parallelism.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..data import trained_tokens
from ..files import atomic_write
from ..methods import adapter_configs, lora_plus_param_groups
from ..model import eval_mode
from ..plot import write_loss_chart
from ..precision import PRECISIONS, Precision, autocast, resolve, restore_frozen, store_frozen
from ..progress import Progress
from .adamw8bit import AdamW8bit
from .state import (
    Interrupted,
    StopRequest,
    TrainingError,
    compare_runs,
    default_save_every,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_metrics,
    read_state,
    remove_partial_saves,
    run_record,
    save_checkpoint,
)
from .task import Task

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit}  # TrainConfig.optim -> the class


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optim: str = "adamw"  # adamw (fp32 state) | adamw8bit (blockwise 8-bit m and v, adamw8bit.py)
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
    offload_activations: bool = False  # CUDA: the tensors backward needs wait in CPU memory (see activation_offload)
    seed: int = 0
    log_every: int = 1
    eval_every: int | None = None  # and at the end, when eval data is given
    save_every: int | None = None  # None: state.default_save_every (a tenth of the run); 0: at the end only
    keep_checkpoints: int = 2
    exact_match: int = 32  # eval examples to answer greedily for exact match (0: none)
    max_new_tokens: int = 64
    loss_chunk: int = 512
    router_aux_loss_coef: float | None = None  # MoE load balancing (SFT); None: the model config's, as transformers
    log: str = "jsonl"  # metrics.jsonl always; "tensorboard" also writes the same scalars under out/tensorboard
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA) | auto: mixed precision, see precision.py

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.log not in ("jsonl", "tensorboard"):
            raise ValueError(f"log must be jsonl or tensorboard, got {self.log!r}")
        if self.log == "tensorboard" and importlib.util.find_spec("tensorboard") is None:  # before any model loads
            raise ImportError("log='tensorboard' needs the tensorboard package: pip install tensorboard (or pip "
                              "install minicustom[tensorboard])")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {self.optim!r}")
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
    if config.lora_plus_ratio:
        return lora_plus_param_groups(model, config.lr, config.lora_plus_ratio, config.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# -- data order ---------------------------------------------------------------------------------------

def epoch_steps(n_units: int, epoch: int, config: TrainConfig, world: int) -> list[list[int]]:
    """The unit indices of each optimizer step of an epoch, in a seeded order (the last may be short)."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    order = torch.randperm(n_units, generator=g).tolist()
    per_step = config.batch_size * config.grad_accum * world
    return [order[i:i + per_step] for i in range(0, n_units, per_step)]


def step_plan(task, epoch: int, config: TrainConfig, world: int) -> list[list[int]]:
    """The units of each step of an epoch: the task's own plan (an RL task's steps over its rollouts) or
    the seeded shuffle of epoch_steps."""
    if hasattr(task, "epoch_plan"):
        return task.epoch_plan(epoch, world)
    return epoch_steps(len(task.units), epoch, config, world)


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

@torch.no_grad()
def evaluate_objective(task, model: nn.Module, wrapper: nn.Module, full: bool) -> dict:
    """The task's eval metrics over every process's share of its eval items (all take part: FSDP's sharded
    forward needs each of them), then its answer metrics (greedy generation) on process 0 alone, except
    under FSDP."""
    rank, world = rank_and_world()
    if hasattr(task, "evaluate"):  # an RL task: its held-out prompts are answered, not scored by a loss
        return task.evaluate(model) if world == 1 or (rank == 0 and not full) else {}
    config = task.config
    share = task.eval_items[rank::world]
    loss_sum, weight, stats = 0.0, 0, {}
    with eval_mode(wrapper):
        for i in range(0, max(len(task.eval_items[0::world]), 1), config.batch_size):
            part = share[i:i + config.batch_size]
            batch = task.eval_batch(part or task.eval_items[:1], filler=not part)  # every process runs as many
            s, st = wrapper(**batch)
            loss_sum, weight = loss_sum + float(s), weight + task.weight(batch)
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + float(v)
    if world > 1:
        sums = torch.tensor([loss_sum, weight, *stats.values()], dtype=torch.float64)
        dist.all_reduce(sums)
        loss_sum, weight = float(sums[0]), int(sums[1])
        stats = dict(zip(stats, sums[2:].tolist()))
    metrics = task.eval_metrics(loss_sum, weight, stats)
    if world == 1 or (rank == 0 and not full):
        metrics.update(task.answer_metrics(model))
    return metrics


# -- gradients ----------------------------------------------------------------------------------------

def accumulate_gradients(wrapper: nn.Module, micros: list[dict], device, world: int = 1,
                         weight: Callable[[dict], int] = trained_tokens, scaler=None,
                         regularizer: Callable[[], torch.Tensor] | None = None) -> tuple[float, int, int, dict]:
    """Backward over the micro-batches of one step (this process's share); returns (mean loss per unit of
    weight over all processes, total weight, tokens, the wrapper's statistics summed and divided by the
    weight). The weight is the trained tokens for SFT, the pairs for DPO: each micro-batch's summed loss
    is divided by the step's total weight, so the gradients are those of one batch holding them all.
    With an fp16 gradient `scaler`, what is backpropagated is scaled by it (the loss returned is not)."""
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
            term = s * (world / max(n_weight, 1))
            if last and regularizer is not None:  # once a step (every process adds it: DDP averages the same term)
                reg = regularizer()
                term = term + reg
            (scaler.scale(term) if scaler is not None else term).backward()
        loss_sum += s.detach().double().cpu()
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v.detach().double().cpu()
    sums = torch.stack([loss_sum, *stats.values()])
    if world > 1:
        dist.all_reduce(sums)
    means = (sums / max(n_weight, 1)).tolist()
    stats = dict(zip(stats, means[1:]))
    if regularizer is not None:
        stats["regularizer"] = float(reg.detach())
    return means[0], n_weight, n_tokens, stats


def activation_offload(config: TrainConfig, device: torch.device):
    """The context of a step's forward and backward. With offload_activations, every tensor autograd saves for
    backward is copied to pinned CPU memory as it is saved and back to the GPU when backward reads it
    (torch.autograd.graph.save_on_cpu). With gradient checkpointing as well, what is saved outside the
    recomputed blocks is each block's input, so the GPU holds one block's activations at a time and the CPU
    the (B, T, C) inputs of all of them."""
    if not config.offload_activations:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def rank_and_world() -> tuple[int, int]:
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


# -- the methods' training hooks ----------------------------------------------------------------------

def method_hooks(model: nn.Module, total: int) -> list:
    """The training hooks of the model's adapters: the seam for a method with a rule of its own at training
    time (AdaLoRA's regularizer and rank allocation), so that the loop names no method. An adapter's config may
    define `training_hooks(model, adapter_name, total_steps)`, called once before the first step (it may refuse
    the run with a ValueError), which returns None or an object with any of
        regularizer() -> a scalar tensor added to the loss once a step (its gradient flows with the loss's)
        after_step(step) -> runs after the optimizer step and before zero_grad (the gradients still there);
                            step counts the steps taken, this one included (1 to total)
        state() -> tensors saved with each checkpoint; load_state(tensors) gives them back on resume."""
    hooks = []
    for name, config in adapter_configs(model).items():
        if hasattr(config, "training_hooks") and (hook := config.training_hooks(model, name, total)) is not None:
            hooks.append((name, hook))
    return hooks


def _regularizer(hooks: list) -> Callable[[], torch.Tensor] | None:
    terms = [hook.regularizer for _, hook in hooks if hasattr(hook, "regularizer")]
    return (lambda: sum(term() for term in terms)) if terms else None


def hook_states(hooks: list) -> dict[str, torch.Tensor] | None:
    """The hooks' checkpointed tensors, each key under its adapter's name (None: nothing to save)."""
    state = {f"{name}\x1f{k}": t for name, hook in hooks if hasattr(hook, "state") for k, t in hook.state().items()}
    return state or None


def load_hook_states(hooks: list, tensors: dict[str, torch.Tensor]):
    for name, hook in hooks:
        if hasattr(hook, "load_state"):
            prefix = f"{name}\x1f"
            hook.load_state({k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)})


# -- the loop -----------------------------------------------------------------------------------------

@dataclass
class Run:
    """One run in progress: what setup() prepared and each step reads or advances."""

    task: Task
    model: nn.Module
    wrapper: nn.Module  # the task's loss module, wrapped by DDP or FSDP2 under torchrun
    optimizer: torch.optim.Optimizer
    out: Path
    identity: dict  # the record a checkpoint keeps (state.run_record)
    history: list[dict]
    step: int
    total: int
    per_epoch: int
    full: bool  # every parameter trains (FSDP2 under torchrun)
    rank: int
    world: int
    device: torch.device
    progress: Progress | None = None
    board: object = None  # a torch.utils.tensorboard SummaryWriter with log="tensorboard" (process 0)
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    hooks: list = field(default_factory=list)  # the adapters' training hooks (method_hooks)

    @property
    def config(self) -> TrainConfig:
        return self.task.config

    @property
    def folder(self) -> Path:
        return self.out / "checkpoints"

    def say(self, text: str):
        if self.rank == 0:
            print(text, file=sys.stderr)


def setup(task: Task, model: nn.Module, out: str | Path, resume: bool, data_files, options,
          precision: Precision | None = None) -> Run:
    """Check that there is something to train, find the checkpoint to resume from (refusing another run's),
    build the optimizer, restore its state, and evaluate the starting point of a new run."""
    config, out = task.config, Path(out)
    rank, world = rank_and_world()
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("no parameter requires grad: apply a method (e.g. apply_lora) first")
    full = all(p.requires_grad for p in model.parameters())
    per_epoch = len(step_plan(task, 0, config, world))
    if per_epoch == 0:
        raise TrainingError(f"{len(task.units)} rows cannot fill one step of {config.batch_size} rows x "
                            f"{config.grad_accum} micro-batches x {world} processes")
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    hooks = method_hooks(model, total)  # before anything is written: a method may refuse the run's schedule
    latest = latest_checkpoint(out, resume)
    identity = run_record(model, config, task.data_digest(), data_files, options)  # before FSDP shards it
    saved = read_state(latest) if latest else {"step": 0}
    changes = compare_runs(saved.get("run"), identity, latest) if latest else []
    if latest and (was := ((saved.get("run") or {}).get("config") or {}).get("optim", "adamw")) != config.optim:
        raise TrainingError(f"{latest}: the checkpoint holds {was}'s optimizer state, this run asks for "
                            f"{config.optim}; resume with optim {was}")
    if config.optim == "adamw8bit" and full and world > 1:
        raise TrainingError("optim adamw8bit needs each parameter whole (a block's absmax spans it), but full "
                            "fine-tuning under torchrun shards them (FSDP2): use optim adamw")

    torch.manual_seed(config.seed)
    model.train()
    model.gradient_checkpointing = config.gradient_checkpointing
    module = task.loss_module(model)  # its own parameters (PPO's value head) train beside the model's
    wrapper = _wrap(model, module, full)
    optimizer = OPTIMIZERS[config.optim](param_groups(module, config), lr=config.lr, betas=config.betas)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    device = next(p for p in model.parameters() if p.requires_grad).device
    job = Run(task, model, wrapper, optimizer, out, identity, [], 0, total, per_epoch, full, rank, world, device,
              hooks=hooks)
    if precision is not None and precision.name == "fp16":
        job.scaler = torch.amp.GradScaler(device.type)
    if rank == 0:
        job.folder.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(job.folder, job.say)
    if latest:
        job.history = read_metrics(out / "metrics.jsonl", saved["step"], job.say)
        job.step = load_checkpoint(latest, wrapper, optimizer, getattr(task, "load_state", None),
                                   lambda tensors: load_hook_states(hooks, tensors))
        for group, fresh in zip(optimizer.param_groups, param_groups(module, config)):  # this run's options
            group.update(peak_lr=fresh.get("lr", config.lr), weight_decay=fresh["weight_decay"], betas=config.betas)
        for change in changes:
            job.say(f"resume: {change}")
        job.say(f"resuming from {latest} (step {job.step} of {total})")
    if job.step == 0 and task.eval_items:  # the starting point, for comparison
        job.history = [{"step": 0, **evaluate_objective(task, model, wrapper, full)}]
    if rank == 0:
        atomic_write(out / "metrics.jsonl", lambda p: p.write_text("".join(json.dumps(x) + "\n" for x in job.history)))
        if config.log == "tensorboard":
            job.board = _board(out / "tensorboard", job.step)
            for record in job.history if job.step == 0 else []:
                _scalars(job.board, record)
    job.progress = Progress(total, job.step, enabled=rank == 0)  # the clock starts with the first step
    return job


def train_step(job: Run, units: list[int]) -> dict:
    """One optimizer step over `units` (every process's rows of the step); returns its metrics record. A
    non-finite loss or gradient stops the run before the optimizer touches the weights."""
    config, t0 = job.config, time.perf_counter()
    for group in job.optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(job.step, job.total, config)
    micros = step_batches(job.task, units, config, job.rank, job.world)
    with activation_offload(config, job.device):
        loss, n_weight, n_tokens, stats = accumulate_gradients(job.wrapper, micros, job.device, job.world,
                                                               job.task.weight, job.scaler, _regularizer(job.hooks))
    if hasattr(job.task, "step_metrics"):  # metrics that are ratios of the step's sums (KTO's per-label means)
        stats = job.task.step_metrics(stats)
    if job.scaler is not None:
        stats["loss_scale"] = job.scaler.get_scale()
        job.scaler.unscale_(job.optimizer)
    grad_norm = _clip(job.model, config.max_grad_norm)
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or job.scaler is not None):
        latest = job.folder / "latest"
        kept = job.folder / latest.read_text().strip() if latest.exists() else "none yet"
        raise TrainingError(f"the loss is {loss} (gradient norm {grad_norm}) at step {job.step + 1}; the weights "
                            f"were not updated. Last good checkpoint: {kept}. Lower the learning rate, check the "
                            "data, or train in float32.")
    if job.scaler is not None:  # an overflow (inf gradient) skips the step and halves the scale
        job.scaler.step(job.optimizer)
        job.scaler.update()
    else:
        job.optimizer.step()
    for _, hook in job.hooks if math.isfinite(grad_norm) else []:  # not after a step fp16's scaler skipped
        if hasattr(hook, "after_step"):
            hook.after_step(job.step + 1)  # the step's gradients are still there
    job.optimizer.zero_grad(set_to_none=True)
    job.step += 1
    seconds = time.perf_counter() - t0
    return {"step": job.step, "epoch": round(job.step / job.per_epoch, 4), "loss": loss, **stats,
            "lr": job.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, job.task.weight_name: n_weight,
            "tokens": n_tokens, "tokens_per_s": n_tokens / seconds}


def save(job: Run):
    """A checkpoint of the step just taken (every process writes its share), then the loss chart."""
    save_checkpoint(job.folder, job.wrapper, job.optimizer, job.step, job.rank, job.identity,
                    job.task.state() if hasattr(job.task, "state") else None, hook_states(job.hooks))
    if job.rank == 0:
        prune_checkpoints(job.folder, job.config.keep_checkpoints)
        write_loss_chart(job.out, job.history)


def log_and_save(job: Run, record: dict) -> bool:
    """Evaluate when due, append the record to metrics.jsonl, update the progress line, and save a
    checkpoint when due (always after the last step); returns whether it saved."""
    config, last = job.config, job.step == job.total
    if job.task.eval_items and ((config.eval_every and job.step % config.eval_every == 0) or last):
        record.update(evaluate_objective(job.task, job.model, job.wrapper, job.full))
    job.history.append(record)
    if job.rank == 0:
        with open(job.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if job.board is not None:
            _scalars(job.board, record)
        if job.step % config.log_every == 0 or last or "eval_loss" in record:
            extra = f" eval {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            job.progress.update(job.step, f"loss {record['loss']:.4f}{extra} lr {record['lr']:.2e} | "
                                      f"{record['tokens_per_s']:,.0f} tok/s")
    every = default_save_every(job.total) if config.save_every is None else config.save_every
    due = bool(every and job.step % every == 0) or last
    if due:
        save(job)
    return due


def run(task: Task, model: nn.Module, out: str | Path, *, resume: bool = False,
        on_step: Callable[[int, dict], None] | None = None, data_files=None, options: dict | None = None
        ) -> list[dict]:
    """Train the parameters of `model` that require grad on `task`; returns the logged metrics (see
    sft.train for the folder it writes). Ctrl-C stops at the next step boundary, saves a checkpoint and
    raises Interrupted (a KeyboardInterrupt)."""
    made = [d for d in (Path(out), Path(out) / "checkpoints") if not d.exists()]
    device = next(model.parameters()).device
    chosen = resolve(task.config.precision, device)
    if task.config.precision != "fp32" and rank_and_world()[0] == 0:
        print(f"precision: {chosen.name} ({chosen.reason})", file=sys.stderr)
    if chosen.mixed and (low := next((n for n, p in model.named_parameters()
                                      if p.requires_grad and p.dtype != torch.float32), None)):
        raise TrainingError(f"precision {chosen.name} keeps the trained weights in float32 (master weights), but "
                            f"{low} is {model.get_parameter(low).dtype}: load the model in float32")
    if task.config.offload_activations and device.type != "cuda":
        raise TrainingError(f"offload_activations moves the activations saved for backward from the GPU to CPU "
                            f"memory, but the model is on {device.type}: leave it off there")
    moved = store_frozen(model, chosen.dtype) if chosen.mixed else {}
    try:
        with autocast(chosen, device):
            job = setup(task, model, out, resume, data_files, options, chosen)
            try:
                return _steps(job, on_step)
            except TrainingError:
                if job.rank == 0 and not (job.folder / "latest").exists():  # a new run that kept nothing: no trace
                    (job.out / "metrics.jsonl").unlink(missing_ok=True)
                    for folder in reversed(made):
                        with contextlib.suppress(OSError):
                            folder.rmdir()
                raise
            finally:
                if job.board is not None:
                    job.board.close()
    finally:
        restore_frozen(model, moved)


def _steps(job: Run, on_step) -> list[dict]:
    """The loop of run(): the epochs' plans, a step, its log and checkpoint, a Ctrl-C between steps."""
    task = job.task
    plan_epoch, plan = -1, []
    with StopRequest() as stop:
        while job.step < job.total:
            epoch, index = divmod(job.step, job.per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = step_plan(task, epoch, job.config, job.world), epoch
            before = task.before_step(job) if hasattr(task, "before_step") else {}  # an RL task's rollout
            record = train_step(job, plan[index])
            record.update(before)
            saved = log_and_save(job, record)
            if on_step is not None:
                on_step(job.step, record)
            if job.step < job.total and stop.agreed(job.world, job.device):  # after the step: a regular checkpoint
                if not saved:
                    save(job)
                job.progress.close()
                raise Interrupted(f"interrupted at step {job.step} of {job.total}; the run is saved in "
                                  f"{job.folder / f'checkpoint-{job.step:06d}'}")
    job.progress.close()
    return job.history


def _board(folder: Path, step: int):
    """A TensorBoard writer into `folder`; a resumed run hides what its first run logged past `step`
    (purge_step), so the curve continues from the checkpoint as metrics.jsonl does."""
    from torch.utils.tensorboard import SummaryWriter  # TrainConfig checked that tensorboard is installed

    return SummaryWriter(str(folder), purge_step=step + 1 if step else None)


def _scalars(board, record: dict) -> None:
    """Every number of a metrics.jsonl record as a scalar at its step."""
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            board.add_scalar(key, value, record["step"])
    board.flush()


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
