"""What lets a training run be resumed, and refuses to resume the wrong one.

A checkpoint (`OUT/checkpoints/checkpoint-NNNNNN/`) holds the trainable tensors, the optimizer state,
the RNG state and the step, written to `.checkpoint-NNNNNN.tmp/` and renamed when complete (a killed
save leaves only the temporary folder, removed by the next run). Its state.json also records the run:

    config   the TrainConfig (applied on resume: every change is printed, "resume: lr 0.0002 -> 0.0001")
    model    the base model's fingerprint: the architecture (ModelConfig.fingerprint), the frozen
             tensors' names, dtypes and shapes, and a sample of their values (about a thousand evenly
             spaced values per tensor: reading them all would cost seconds per billion parameters,
             and two different bases differ nearly everywhere)
    data     a hash of the tokenized examples (what the loop trains on) and the sha256 of each data file
    options  whatever the caller adds (the command line: the model folder, the method and its options)
A resume with another base, other examples or another method is refused, naming what differs.

Ctrl-C (SIGINT) while training asks the loop to stop at the next step boundary: the step in flight
finishes, a checkpoint is written, and `Interrupted` (a KeyboardInterrupt) names it; the checkpoint is
the one a save at that step would have written, so the resumed run is the uninterrupted one, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from array import array
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write, io_error


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not match the run)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary, after saving a checkpoint (named in the message)."""


def default_save_every(total: int) -> int:
    """Checkpoints when save_every is None: every tenth of the run, at least every step and at most
    every 100 steps, so a killed run loses at most a tenth of its work (or 100 steps)."""
    return min(100, max(1, total // 10))


# -- the record of a run ------------------------------------------------------------------------------

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def examples_digest(examples) -> str:
    """sha256 of the examples' token ids and labels, in order (what the loop actually trains on)."""
    h = hashlib.sha256()
    for e in examples:
        for ids in (e.input_ids, e.labels):
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """The base model's identity: architecture, frozen tensors (names, dtypes, shapes) and a sample of
    their values. The trainable tensors are left out: the checkpoint restores them."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    shapes, values = hashlib.sha256(), hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if name in trainable or not isinstance(t, torch.Tensor):
            continue
        shapes.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            sample = torch.cat([flat[::max(1, flat.numel() // 1024)], flat[-1:]]).cpu().contiguous()
            values.update(sample.view(torch.uint8).numpy().tobytes())
    return {"architecture": model.config.fingerprint(), "tensors": shapes.hexdigest()[:16],
            "weights": values.hexdigest()[:16]}


def config_dict(config) -> dict:
    """The dataclass's fields as JSON values; fields hidden from repr are derived ones and are left out."""
    return json.loads(json.dumps({f.name: getattr(config, f.name) for f in fields(config) if f.repr}))


def run_record(model: nn.Module, config, data_digest: str, data_files=None, options: dict | None = None) -> dict:
    return {"config": config_dict(config), "model": model_fingerprint(model),
            "data": {"digest": data_digest, "files": {str(f): file_sha256(f) for f in data_files or ()}},
            "options": json.loads(json.dumps(options or {}, default=str))}


_MODEL_PARTS = {"architecture": "its architecture (config.json)", "tensors": "its tensors' names, dtypes or shapes",
                "weights": "its weights (same shapes, other values)"}


def compare_runs(old: dict | None, new: dict, where: Path) -> list[str]:
    """Refuse (TrainingError) a resume onto another base model, other data or another method; return
    the changed options, each as 'name old -> new', to be printed and applied."""
    if old is None:
        return [f"{where} predates run records: the model and data were not checked"]
    trained_on = old["options"].get("model")
    on = f" (the checkpoint's base: {trained_on})" if trained_on else ""
    if differs := [_MODEL_PARTS[k] for k in _MODEL_PARTS if old["model"].get(k) != new["model"][k]]:
        raise TrainingError(f"{where}: the base model differs from the checkpoint's{on}: "
                            f"{', '.join(differs)}; resume with the model the run started from")
    changed = [f"{now} (sha256 {h[:12]}) is not {was} (sha256 {h0[:12]})" for (was, h0), (now, h)
               in zip(old["data"]["files"].items(), new["data"]["files"].items()) if h != h0]
    if old["data"]["digest"] != new["data"]["digest"]:
        why = ("; ".join(changed) if changed else "same files, so other tokenization options (--max-length, "
               "--truncation, --chat-template, templates) or another tokenizer")
        raise TrainingError(f"{where}: the training data differs from the checkpoint's: {why}; resume with "
                            "the data the run started with, or start a new run in another folder")
    if old["options"].get("method") != new["options"].get("method"):
        raise TrainingError(f"{where}: the checkpoint trained method {old['options'].get('method')!r}, this "
                            f"run asks for {new['options'].get('method')!r}; resume with the same method")
    was, now = old["config"].get("lora_plus_ratio"), new["config"].get("lora_plus_ratio")
    if (was is None) != (now is None):
        raise TrainingError(f"{where}: lora_plus_ratio {was} -> {now} changes the optimizer's parameter groups; "
                            "a resumed run keeps LoRA+ on or off as it started")
    changes = [f"data file {c}, but its examples tokenize as before" for c in changed]
    for part in ("config", "options"):
        for key in sorted(set(old[part]) | set(new[part])):
            if old[part].get(key) != new[part].get(key):
                changes.append(f"{key} {old[part].get(key)!r} -> {new[part].get(key)!r}")
    return changes


# -- metrics ------------------------------------------------------------------------------------------

def read_metrics(path: Path, step: int, report=print) -> list[dict]:
    """The rows of metrics.jsonl up to `step`. A torn last line (a write cut short by a kill) is dropped
    with a notice; any other unreadable line is an error naming file and line."""
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                report(f"{path}:{i}: dropped a torn last line (a write cut short): {line[:60]!r}")
                break
            raise TrainingError(f"{path}:{i}: not valid JSON ({e.msg}); remove the line to resume") from None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise TrainingError(f"{path}:{i}: a metrics row needs an integer 'step', got {line[:60]!r}")
        rows.append(row)
    return [r for r in rows if r["step"] <= step]


# -- checkpoints --------------------------------------------------------------------------------------

def latest_checkpoint(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (resume=True), or None for a new run; refuses a resume with nothing
    to resume and a new run over an old one's checkpoints."""
    folder = Path(out) / "checkpoints"
    pointer = folder / "latest"
    if not resume:
        if pointer.exists():
            raise TrainingError(f"{out} already holds checkpoints of a run: pass resume=True (--resume) to "
                                "continue it, or choose another output folder")
        return None
    if not pointer.exists():
        raise TrainingError(f"{folder}: no checkpoint to resume from (no 'latest' file): start the run "
                            "without resume=True (--resume), or name the folder of the run to continue")
    latest = folder / pointer.read_text().strip()
    if not (latest / "state.json").is_file():
        raise TrainingError(f"{pointer} names {latest.name}, which holds no state.json (a checkpoint deleted "
                            "by hand?); point 'latest' at a complete checkpoint folder")
    return latest


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path / 'state.json'}: cannot read the checkpoint's state ({e})") from None
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and "optimizer" in state):
        raise TrainingError(f"{path / 'state.json'}: not a checkpoint's state (expected 'step' and 'optimizer')")
    return state


def remove_partial_saves(folder: Path, report=print):
    """Remove the temporary folders of saves cut short (a killed or full-disk save)."""
    for tmp in sorted(folder.glob(".checkpoint-*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        report(f"removed {tmp}, a checkpoint whose save was cut short")


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for key, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}\x1f{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}\x1f{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        key, slot = flat.split("\x1f")
        state.setdefault(key, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def sharded(wrapper: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapper, FSDPModule)


def _trainable(wrapper: nn.Module) -> dict[str, nn.Parameter]:
    inner = getattr(wrapper, "module", wrapper)  # DDP keeps the module as .module; its names have no prefix
    return {n: p for n, p in inner.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, wrapper: nn.Module, optimizer, step: int, rank: int, record: dict | None = None,
                    task_state: dict[str, torch.Tensor] | None = None,
                    method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint-{step}: trainable tensors, optimizer state, RNG, step and the run's record, and
    the task's own state when it has one (an RL task's current rollout, task.safetensors), and the adapters'
    training hooks' (AdaLoRA's importance averages and rank mask, method.safetensors)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    trainable = set(_trainable(wrapper))
    if sharded(wrapper):  # FSDP2: gather the full tensors
        model_state = get_model_state_dict(wrapper, options=options)
    else:  # every process holds them whole; and 4-bit layers' bitsandbytes keys are not attribute paths
        model_state = dict(getattr(wrapper, "module", wrapper).named_parameters())
    optim_state = get_optimizer_state_dict(wrapper, optimizer, options=options)
    final = folder / f"checkpoint-{step:06d}"
    if rank != 0:
        return final
    tmp = folder / f".checkpoint-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        weights = {n: t.detach().cpu().contiguous() for n, t in model_state.items() if n in trainable}
        save_file(weights, tmp / "trainable.safetensors")
        tensors, meta = _flatten_optimizer(optim_state)
        tensors["\x1frng"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        if task_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in task_state.items()}, tmp / "task.safetensors")
        if method_state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, tmp / "method.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, "run": record}))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    except BaseException as e:  # a full disk, say: no half-written folder; the previous checkpoint stands
        shutil.rmtree(tmp, ignore_errors=True)
        if (error := io_error(e, final)) is not None:
            raise error from None
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write(folder / "latest", lambda p: p.write_text(final.name + "\n"))
    return final


def prune_checkpoints(folder: Path, keep: int):
    done = sorted(folder.glob("checkpoint-[0-9]*"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, wrapper: nn.Module, optimizer, load_task_state=None, load_method_state=None) -> int:
    """Restore a checkpoint written by save_checkpoint; returns its step. Every name and shape is checked
    before a tensor is copied. load_task_state receives the task's saved tensors, load_method_state the
    training hooks' (an empty dict if none)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_state(path)
    try:
        with safe_open(path / "trainable.safetensors", "pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(path / "optimizer.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        task_state, method_state = {}, {}
        if (path / "task.safetensors").exists():
            with safe_open(path / "task.safetensors", "pt") as f:
                task_state = {k: f.get_tensor(k) for k in f.keys()}
        if (path / "method.safetensors").exists():
            with safe_open(path / "method.safetensors", "pt") as f:
                method_state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise TrainingError(f"{path}: cannot read the checkpoint ({e})") from None
    params = _trainable(wrapper)
    if set(weights) != set(params):
        raise TrainingError(f"{path}: the checkpoint's trainable tensors do not match this run's "
                            f"(missing {sorted(set(params) - set(weights))[:3]}, "
                            f"unexpected {sorted(set(weights) - set(params))[:3]}); same method and options?")
    for name, t in weights.items():
        shape = tuple(params[name].shape)  # a DTensor's shape is the whole tensor's
        if tuple(t.shape) != shape:
            raise TrainingError(f"{path}: trainable tensor {name} has shape {tuple(t.shape)} in the checkpoint, "
                                f"{shape} in this run; same method options (--r, --num-virtual-tokens, ...)?")
    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=False)
    if sharded(wrapper):
        set_model_state_dict(wrapper, weights, options=options)
    else:
        with torch.no_grad():
            for name, t in weights.items():
                params[name].copy_(t)
    if load_task_state is not None:
        load_task_state(task_state)
    if load_method_state is not None:
        load_method_state(method_state)
    torch.set_rng_state(tensors.pop("\x1frng"))
    set_optimizer_state_dict(wrapper, optimizer, _unflatten_optimizer(tensors, state["optimizer"]),
                             options=options)
    return state["step"]


# -- Ctrl-C -------------------------------------------------------------------------------------------

class StopRequest:
    """The first SIGINT sets `requested` (the loop stops at the next step boundary); the handler then
    steps aside, so a second Ctrl-C interrupts at once. Installed only from the main thread (the only
    one that may set handlers) and only where SIGINT is not ignored (a background job); the previous
    handler is back on exit."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):
                self.previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        sys.stderr.write("\nCtrl-C: stopping after this step and saving a checkpoint "
                         "(Ctrl-C again stops at once, unsaved)\n")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def agreed(self, world: int, device) -> bool:
        """Whether any process was asked to stop (all must stop at the same step)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
