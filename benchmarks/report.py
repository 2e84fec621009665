"""Benchmark results: printed as JSON on stdout and, when a path is given, written there too."""

from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
