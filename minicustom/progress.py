"""The progress line of long work (training steps, evaluation batches) on stderr: rewritten in place on a
terminal, one line per update otherwise (a log file), with the elapsed time and an estimate of the rest."""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One status line on stderr: rewritten in place on a terminal, a line per log step otherwise."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start, self.enabled = total, start, enabled
        self.t0, self.tty = time.perf_counter(), sys.stderr.isatty()

    def update(self, step: int, text: str):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        line = f"step {step}/{self.total} [{100 * step / self.total:3.0f}%] {text} | {_clock(elapsed)} < {_clock(eta)}"
        sys.stderr.write(("\r\x1b[2K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")
