"""A small Dockerfile reader for the deploy tests: enough of the syntax to take the final stage's
ENV, RUN, USER, WORKDIR, HEALTHCHECK, ENTRYPOINT and CMD out of deploy/Dockerfile*, so that the
tests run what the image runs instead of a copy of it.

Handled: comments and parser directives, backslash continuations (with comment lines inside
them, which Docker drops), stages, ENV `k=v ...` (quotes, $VAR and ${VAR} from earlier ENV and
the base environment), and JSON exec form. Not handled (and not used by our Dockerfiles): heredocs,
a changed escape character, the legacy `ENV k v` form.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str     # the rest of the instruction, continuations joined
    line: int     # 1-based line where it starts


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(text: str) -> list[Instruction]:
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # comments (also inside a continuation) and blank lines between instructions
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if pending:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def stages(path: Path) -> list[Stage]:
    result: list[Stage] = []
    for ins in instructions(path.read_text()):
        if ins.keyword == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append(Stage(parts[0], name))
        elif ins.keyword == "ARG" and not result:
            continue  # global ARGs before the first FROM
        else:
            if not result:
                raise ValueError(f"{path}:{ins.line}: {ins.keyword} before FROM")
            result[-1].instructions.append(ins)
    return result


def exec_form(ins: Instruction) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/RUN; shell form raises."""
    value = json.loads(ins.args)
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f"line {ins.line}: {ins.keyword} is not a JSON array of strings")
    return value


def expand(value: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


def stage_env(stage: Stage, base_env: dict[str, str]) -> dict[str, str]:
    """The variables the stage's ENV instructions set, expanded against base_env and each other."""
    env = dict(base_env)
    declared: dict[str, str] = {}
    for ins in stage.all("ENV"):
        for word in shlex.split(ins.args):
            key, sep, value = word.partition("=")
            if not sep:
                raise ValueError(f"line {ins.line}: use ENV key=value, got {word!r}")
            env[key] = declared[key] = expand(value, env)
    return declared


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    """(options, exec-form command) of the stage's HEALTHCHECK."""
    ins = stage.last("HEALTHCHECK")
    if ins is None:
        raise ValueError("no HEALTHCHECK")
    options: dict[str, str] = {}
    rest = ins.args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        key, _, value = option[2:].partition("=")
        options[key] = value
        rest = rest.strip()
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        raise ValueError(f"line {ins.line}: HEALTHCHECK {keyword}")
    return options, exec_form(Instruction("CMD", command.strip(), ins.line))


def start_command(stage: Stage) -> list[str]:
    """ENTRYPOINT followed by CMD, both in exec form, as `docker run IMAGE` starts them."""
    entry, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
    return (exec_form(entry) if entry else []) + (exec_form(cmd) if cmd else [])
