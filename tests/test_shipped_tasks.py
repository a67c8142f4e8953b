"""The shipped tasks (examples/data/tasks): make_tasks.py regenerates every file byte for byte, and the
arithmetic splits are held out from each other, test_large included (the GRPO demo's measurement)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parents[1] / "examples/data"
ARITHMETIC_SPLITS = ("train", "validation", "test", "test_large")


def test_make_tasks_regenerates_the_shipped_files(tmp_path):
    for script in ("make_tasks.py", "make_city_task.py"):
        shutil.copy(DATA / script, tmp_path / script)
    subprocess.run([sys.executable, "make_tasks.py"], cwd=tmp_path, check=True, capture_output=True)
    made = sorted(p.relative_to(tmp_path / "tasks") for p in (tmp_path / "tasks").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(DATA / "tasks") for p in (DATA / "tasks").rglob("*") if p.is_file())
    assert made == shipped
    for name in made:
        assert (tmp_path / "tasks" / name).read_bytes() == (DATA / "tasks" / name).read_bytes(), name


def test_arithmetic_splits_are_disjoint_and_answered():
    folder = DATA / "tasks/arithmetic"
    counts = json.loads((folder / "task.json").read_text())["counts"]
    seen = {}
    for split in ARITHMETIC_SPLITS:
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == counts[split]
        for row in rows:
            question = row["messages"][1]["content"]
            assert seen.setdefault(question, split) == split, f"{question!r} is in {seen[question]} and {split}"
            # the reference answer is the rationale's last result, and every step's arithmetic is true
            steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", row["rationale"])
            assert steps and steps[-1][3] == row["answer"]
            for a, op, b, c in steps:
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
    assert len(seen) == sum(counts[s] for s in ARITHMETIC_SPLITS)
