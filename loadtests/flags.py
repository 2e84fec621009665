"""argparse value parsers shared by the load test's two command lines (cli, soak_cli)."""

from __future__ import annotations

import argparse
import math


def positive(kind: type):
    """A parser for a finite number > 0 of `kind` (int or float)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v > 0 or (kind is float and not math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
        return v
    return parse
