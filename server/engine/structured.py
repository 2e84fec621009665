"""Structured output: each request's grammar (a JSON schema, any JSON object, a regex, a choice
among strings, or a Lark / GBNF grammar) as a token mask, computed by llguidance.

llguidance was chosen over xgrammar and outlines-core by measurement (benchmarks/bench_grammar.py,
BENCHMARKS.md): it reports every invalid schema, unsupported feature and bad regex at compile
time with a message that names it (xgrammar accepts unsupported features silently), compiles in
about a millisecond without holding the GIL, and has a clean dead-end state.

GrammarCompiler turns a GrammarSpec into a fresh matcher: compiled grammars are cached by spec,
each request gets its own copy. It runs on the caller's thread (never the engine loop) and
refuses, before anything is scheduled, a grammar that does not compile or whose first mask
allows no token (the vocabulary cannot satisfy it). The runner fills one bitmask row per
constrained sequence each step (fill_bitmask); the sampler applies it (sampler.apply_bitmask_);
the output processor advances the matcher with each sampled token (advance).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from server.engine.errors import InvalidRequestError
from server.engine.request import GrammarSpec

# llguidance's names of our kinds; json_object is a JSON schema that any object satisfies
_FORMATS = {"json_schema": "json_schema", "json_object": "json_schema", "regex": "regex", "choice": "choice",
            "grammar": "lark"}
_CACHE_SIZE = 256


@dataclass(frozen=True)
class Advance:
    """What one sampled token did to a request's grammar."""

    complete: bool = False    # the grammar is satisfied and cannot go on: the request ends (stop)
    dead_end: bool = False    # the grammar cannot be continued: the request ends (stop, grammar_dead_end)


class GrammarCompiler:
    """Grammars of one tokenizer; thread-safe. The llguidance tokenizer is built on first use
    (about 0.5 s for a 49k vocabulary), so servers that never see a grammar never pay for it."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._llg_tokenizer = None
        self._compiled: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()

    def _tokenizer(self):
        import llguidance.hf

        with self._lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size)
            return self._llg_tokenizer

    def matcher(self, spec: GrammarSpec):
        """A fresh matcher for spec, or InvalidRequestError naming what is wrong with it."""
        with self._lock:
            template = self._compiled.get(spec)
            if template is not None:
                self._compiled.move_to_end(spec)
                return template.deep_copy()
        template = self._compile(spec)
        with self._lock:
            self._compiled[spec] = template
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def _compile(self, spec: GrammarSpec):
        import llguidance

        text = spec.value
        if spec.kind in ("json_schema", "json_object"):
            text = _compact_json(_schema(spec) if spec.kind == "json_schema" else {"type": "object"})
        try:
            grammar = llguidance.grammar_from(_FORMATS[spec.kind], text)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"{spec.param}: {_first_line(str(exc))}", param=spec.param) from None
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{spec.param}: {_first_line(matcher.get_error())}", param=spec.param)
        mask = torch.zeros(1, _words(self.vocab_size), dtype=torch.int32)  # [1, W]
        fill_bitmask(matcher, mask, 0)
        if matcher.is_error() or not bool(mask.any()):
            raise InvalidRequestError(f"{spec.param}: no output of this model's vocabulary can satisfy it",
                                      param=spec.param)
        return matcher


def _schema(spec: GrammarSpec) -> dict | bool:
    """The spec's JSON schema, or InvalidRequestError when it is not one."""
    try:
        schema = json.loads(spec.value)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{spec.param}: the schema is not valid JSON ({exc.msg} at line {exc.lineno} "
                                  f"column {exc.colno})", param=spec.param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"{spec.param}: a JSON schema is an object (or true / false), "
                                  f"got {type(schema).__name__}", param=spec.param)
    return schema


def _compact_json(schema: dict | bool) -> str:
    """The schema as llguidance's input, with JSON whitespace held to one optional space between
    tokens (llguidance's default allows any run of whitespace, which small models fill with
    newlines), unless the schema sets its own llguidance options ("x-guidance")."""
    if isinstance(schema, dict) and "x-guidance" not in schema:
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": "[ ]?"}}
    return json.dumps(schema)


def _first_line(message: str) -> str:
    """llguidance's message without its parser-state dump; at most 500 characters."""
    return message.split("\n<state>")[0].strip()[:500] or "invalid grammar"


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(V / 32)] int32, all tokens disallowed until filled."""
    return torch.zeros(rows, _words(vocab_size), dtype=torch.int32)


def fill_bitmask(matcher, bitmask: torch.Tensor, row: int) -> None:
    """Bit (t & 31) of word t >> 5 of bitmask[row]: token t is allowed next."""
    import llguidance.torch

    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, row)


def advance(matcher, token_id: int) -> Advance:
    """Feed the sampled token to the request's matcher."""
    if matcher.is_error() or not matcher.consume_token(token_id):
        return Advance(dead_end=True)
    if matcher.is_error():
        return Advance(dead_end=True)
    return Advance(complete=matcher.is_stopped())

