"""What the per-method examples share: the model they run on, their sizes, their output folder, the held-out
slice they are measured on, a short SFT run, and the lines they end with.

MINICUSTOM_SMOKE=1 runs an example on a tiny random model (2 layers, a byte-level BPE vocabulary of 512 trained
on the shipped tasks, SmolLM2's ChatML template) built in a temporary folder, at the smoke sizes: seconds
instead of minutes, so that CI runs them all (tests/test_examples.py). MINICUSTOM_EXAMPLES_OUT (default: runs)
is the folder the examples write under.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import minicustom as mc
from minicustom.cli_common import demo_model
from minicustom.data import make_example, pad_id_for
from minicustom.prompt_library import Variant, evaluate_variant
from minicustom.tasks import TaskFolder, load_task
from minicustom.train import TrainConfig, train

SMOKE = os.environ.get("MINICUSTOM_SMOKE") == "1"
TASKS = Path(__file__).parent / "data" / "tasks"
START = time.perf_counter()
torch.manual_seed(0)  # the adapters' random starts (LoRA's A, ...): torch seeds itself at random in each process
if SMOKE:
    torch.set_num_threads(1)  # a model this small loses more to thread hand-offs than it gains
    sys.modules["matplotlib"] = None  # no loss chart (the run folder is temporary): a second saved per example
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def size(real, smoke):
    """`real` in a real run, `smoke` under MINICUSTOM_SMOKE=1."""
    return smoke if SMOKE else real


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama and a byte-level BPE tokenizer (512 tokens, learned from the shipped tasks' text,
    ids 0-2 its special tokens) written to `folder` as a Hugging Face checkpoint folder."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = [line for file in sorted(TASKS.glob("*/train.jsonl")) for line in file.read_text().splitlines()]
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>",
                            "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": CHATML}))
    config = mc.ModelConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = mc.Transformer(config)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.02)  # as transformers draws it: logits near 0
    mc.save_model(model, folder)
    return folder


def model_path() -> Path:
    """SmolLM2-135M-Instruct (after `minicustom fetch-demo-model`), or under MINICUSTOM_SMOKE=1 a tiny random
    model in a temporary folder, removed at exit."""
    if not SMOKE:
        try:
            return demo_model()
        except FileNotFoundError as e:  # it says to run `minicustom fetch-demo-model`
            sys.exit(str(e))
    folder = Path(tempfile.mkdtemp(prefix="minicustom-smoke-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return tiny_model(folder)


def out_dir(name: str) -> Path:
    """runs/NAME (under $MINICUSTOM_EXAMPLES_OUT if set); a folder that already holds files is refused before
    any work, so that no earlier result is overwritten."""
    out = Path(os.environ.get("MINICUSTOM_EXAMPLES_OUT", "runs")) / name
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} already holds files; nothing was written: remove it, or set MINICUSTOM_EXAMPLES_OUT")
    return out


def held_out(task: str, n_test: int) -> TaskFolder:
    """A shipped task (examples/data/tasks/TASK) with its test split cut to the first n_test records."""
    folder = load_task(TASKS / task, splits=("train", "validation", "test", "prefs_train"))
    folder.test = folder.test[:n_test]
    return folder


def accuracy(model, tok, task: TaskFolder, variant: Variant | None = None) -> mc.EvalResult:
    """Greedy answers to the task's held-out slice, scored by its scorer, as `minicustom compare` measures
    them: zero-shot with each record's own system prompt, unless a prompt variant is given."""
    return evaluate_variant(model, tok, variant or Variant("zero-shot"), task, task.test, score_choices=False)


def sft(model, tok, records: list[dict], steps: int, lr: float, batch: int = 4) -> list[dict]:
    """`steps` steps of the library's SFT loop on task records, training what requires grad; returns the logged
    metrics. Its resumable checkpoints go to a temporary folder: an example saves only its result."""
    examples = [make_example(r, tok, f"record {i + 1}") for i, r in enumerate(records)]
    config = TrainConfig(lr=lr, max_steps=steps, batch_size=batch, packing=False, exact_match=0, save_every=0,
                         log_every=max(1, steps // 8))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        history = train(model, examples, config, run, pad_id=pad_id_for(tok))
    print(f"SFT: {steps} steps of {batch} examples in {time.perf_counter() - t0:.0f} s, training loss "
          f"{history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")
    return history


def report(metric: str, before, after, params: tuple[int, int] | None, saved, sample=None, labels=("before", "after")):
    """The lines every example ends with. before/after: EvalResults (their accuracy) or numbers; params:
    mc.count_parameters(model) while the method is attached (None: nothing trained); sample: a line, or an
    EvalResult whose first answer is shown (default: after's); labels: what before and after are."""
    sample = after if sample is None else sample
    if isinstance(sample, mc.EvalResult):
        r = sample.records[0]
        sample = f"{r['question']!r} -> {r['output'].strip()!r} (reference {r['reference']!r})"
    value = lambda x: x.accuracy if isinstance(x, mc.EvalResult) else x  # noqa: E731
    n = f" on {after.n} held-out questions" if isinstance(after, mc.EvalResult) else ""
    print(f"\n{metric}: {value(before):.3f} {labels[0]} -> {value(after):.3f} {labels[1]}{n}")
    trainable, total = params or (0, 0)
    print(f"trainable parameters: {trainable:,}" + (f" of {total:,} ({100 * trainable / total:.3f}%)" if total
                                                     else " (nothing is trained)"))
    print(f"sample answer: {sample}")
    print(f"saved: {saved}")
    print(f"took {time.perf_counter() - START:.0f} s" + (" (smoke run: a tiny random model)" if SMOKE else ""))
