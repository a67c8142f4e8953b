"""Task folders: the shipped tasks' layout (examples/data/tasks/*), read by `compare`, `prompts` and `ladder`.

    task.json            name, scorer (exact | label | number), labels, max_new_tokens
    train.jsonl          the training split (and the pool of few-shot examples)
    validation.jsonl     what prompt search and the ladder decide on
    test.jsonl           reported only, never used to choose
    prefs_train.jsonl    preference pairs of the training records (DPO)

`load_task(folder, splits)` reads only the splits it is asked for, so a command that must never look at
the test split (prompt search) does not open test.jsonl at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import DataError, read_jsonl
from .files import read_json

SPLITS = ("train", "validation", "test", "prefs_train")


@dataclass
class TaskFolder:
    folder: Path
    name: str
    scorer: str
    labels: list[str] | None
    max_new_tokens: int
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    prefs: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)

    @property
    def chain_of_thought_data(self) -> bool:
        return any("rationale" in r for r in self.train)


def load_task(folder, splits=("train", "test", "prefs_train")) -> TaskFolder:
    """A task folder with the named splits read (prefs_train only if present; validation and test must be)."""
    folder = Path(folder)
    if unknown := [s for s in splits if s not in SPLITS]:
        raise ValueError(f"unknown split {unknown}: splits are {', '.join(SPLITS)}")
    if not (folder / "task.json").is_file():
        raise DataError(f"{folder}: not a task folder (no task.json; see examples/data/tasks/)")
    file = folder / "task.json"
    meta = read_json(file, DataError)
    if not isinstance(meta, dict):
        raise DataError(f"{file}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("scorer") not in ("exact", "label", "number"):
        raise DataError(f"{file}: 'scorer' must be exact, label or number, got {meta.get('scorer')!r}")
    labels, max_new = meta.get("labels"), meta.get("max_new_tokens", 32)
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise DataError(f"{file}: 'labels' must be a list of strings, got {labels!r}")
    if not (isinstance(max_new, int) and not isinstance(max_new, bool) and max_new >= 1):
        raise DataError(f"{file}: 'max_new_tokens' must be a positive integer, got {max_new!r}")
    if "validation" in splits and not (folder / "validation.jsonl").is_file():
        raise DataError(f"{folder}: no validation.jsonl; prompts are chosen on the validation split (the test "
                        "split is kept for the final report), so the task needs one")
    read = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        read[split] = [] if split == "prefs_train" and not path.is_file() else [r for _, r in read_jsonl(path)]
    return TaskFolder(folder, meta.get("name", folder.name), meta["scorer"], labels, max_new,
                      train=read.get("train", []), test=read.get("test", []), prefs=read.get("prefs_train", []),
                      validation=read.get("validation", []))
