"""Every method of issue 6 end to end through the command line: `train sft --method M` trains and
exports an adapter folder, and `generate --adapter` answers with it exactly as the library does."""

import json
from pathlib import Path

import pytest
import torch

import minicustom as mc
from minicustom.cli import main
from minicustom.prompting import default_stop_ids

METHODS = {  # method -> extra arguments (small sizes for the tiny model)
    "ia3": [],
    "adapter": ["--reduction-factor", "8", "--placement", "parallel"],
    "llama-adapter": ["--adapter-len", "4", "--adapter-layers", "2"],
    "prefix": ["--num-virtual-tokens", "4", "--prefix-projection", "--gradient-checkpointing"],
    "prompt": ["--num-virtual-tokens", "4", "--prompt-init", "text", "--prompt-init-text", "Name the city"],
    "ptuning": ["--num-virtual-tokens", "4", "--encoder", "lstm"],
}
PEFT_TYPES = {"ia3": "IA3", "adapter": "BOTTLENECK_ADAPTER", "llama-adapter": "ADAPTION_PROMPT",
              "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}


def _train(setup, out, method, *extra):
    root, path = setup
    main(["train", "sft", "--model", str(path), "--data", str(root / "train.jsonl"), "--out", str(out),
          "--method", method, "--max-length", "128", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-2",
          "--exact-match", "0", "--seed", "1", *METHODS[method], *extra])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_then_generate_with_the_adapter(setup, tmp_path, capsys, method):
    root, path = setup
    out = tmp_path / "run"
    _train(setup, out, method)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    capsys.readouterr()

    args = ["--prompt", "Where is Paris?", "--max-new-tokens", "6"]
    main(["generate", "--model", str(path), "--adapter", str(out), *args])
    cli_answer = capsys.readouterr().out

    model, tok = mc.load_model(path), mc.load_tokenizer(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Where is Paris?"}], add_generation_prompt=True)
    with torch.no_grad():
        base = model(torch.tensor([ids]))
    mc.load_adapter(model, out)
    with torch.no_grad():
        adapted = model(torch.tensor([ids]))
    assert not torch.equal(adapted, base)  # three steps at lr 1e-2 moved the adapter off its start
    new = model.generate(torch.tensor([ids]), max_new_tokens=6, stop=default_stop_ids(model, tok))[0, len(ids):]
    assert tok.decode(new.tolist(), skip_special_tokens=True).strip() in cli_answer


def test_prompt_tuning_resumes_onto_the_same_curve(setup, tmp_path):
    """Checkpoints hold the virtual tokens and their optimizer state like any adapter's."""
    def losses(out):
        return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    common = ["--schedule", "constant", "--save-every", "2"]
    _train(setup, tmp_path / "straight", "prompt", *common, "--max-steps", "4")
    _train(setup, tmp_path / "split", "prompt", *common, "--max-steps", "2")
    _train(setup, tmp_path / "split", "prompt", *common, "--max-steps", "4", "--resume")
    assert losses(tmp_path / "split")[-2:] == losses(tmp_path / "straight")[-2:]
