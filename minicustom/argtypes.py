"""Parsers of command-line values (argparse `type=`), each failing with a one-line message that argparse
prefixes with the option's name ("argument --r: must be >= 1, got 0") and exit code 2. A leaf module: the
methods declare their options' numeric types with these (--targets' parser is methods/base.py's), and the
command line reads them from the registry.
"""

from __future__ import annotations

import argparse
import math


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
UNIT = checked(float, lambda v: 0 < v < 1, "in (0, 1)")
PROBABILITY = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
FRACTION = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def float_list(text: str) -> list[float]:
    return [FINITE(w) for w in text.split(",")]


DROPOUT = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")
