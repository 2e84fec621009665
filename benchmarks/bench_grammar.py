"""Grammar engines for structured output, side by side: xgrammar, llguidance, outlines-core.

    .venv/bin/python -m benchmarks.bench_grammar [--reps 5] [--batch 16] [--json out.json]

One process, the default model's tokenizer (SmolLM2-135M-Instruct, vocabulary 49152) for all
three libraries. Progress goes to stderr, the JSON report to stdout (and to --json). Measured:

  - setup_s: building each library's tokenizer object from the Hugging Face tokenizer
    (xgrammar TokenizerInfo.from_huggingface, llguidance.hf.from_tokenizer, an outlines-core
    Vocabulary of token bytes);
  - per grammar case (flat schema, nested schema, any JSON object, two regexes, a choice among 4
    strings, a small EBNF): compile time (first and median of a few uncached compiles), the time to
    make a matcher for a new request, and the first mask on it;
  - mask time per token: a valid output is tokenized with the model's tokenizer and walked:
    fill the next-token bitmask (int32 [1, 1536]), check the next token's bit, accept it; the
    first walk is "cold" (lazy work a library defers to mask time lands there), the later walks
    use fresh matchers from the same compiled grammar ("warm"); median and p99 in microseconds;
  - batch: 16 rows mixing the three JSON cases at different positions, per decode step: the
    library's batched fill (xgrammar BatchGrammarMatcher, llguidance LLExecutor) and a plain
    Python loop of per-row fills, plus the batched accept;
  - applying a bitmask to [B, 49152] float32 logits on CPU (xgrammar's CPU kernel and a plain torch
    unpack that works for any of the three, since all use the same bitmask layout);
  - correctness: every token of the valid output allowed, EOS accepted at the end and the matcher
    terminated; a wrong first token (a letter where '{' must start) masked out and rejected;
    rollback of 3 tokens restores the earlier mask; masks compared with xgrammar's;
  - errors: invalid schema JSON, unknown type, unsupported keywords, remote $ref, contradictory
    schemas, bad regexes, a bad EBNF, and a vocabulary without digits for a digits-only regex:
    where each library reports it (compile / matcher / first mask) and with what exception;
  - semantics: regex alternation order, Unicode \\d, special tokens inside JSON strings, EOS in a
    final state (behaviours found to differ between the libraries);
  - xgrammar again with enable_dynamic_compilation=True (mask cache built lazily);
  - threads: compiling off the main thread (does it hold the GIL?), two compiles at once.

xgrammar's TokenizerInfo is rebuilt with the tokenizer's special/added tokens blanked (see
XGrammar.setup); from_huggingface as is lets them appear inside JSON strings.

Timings are wall-clock on whatever else the machine is doing; load averages are in the report.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from server.api.streaming import _byte_decoder

pc = time.perf_counter


def log(msg: str) -> None:
    print(f"[bench_grammar] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Grammar cases: (kind, spec, a valid output)

FLAT_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "score", "active"],
    "additionalProperties": False,
}
FLAT_SAMPLE = {"name": "Alice Smith", "age": 34, "score": 87.5, "active": True}

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 5,
        },
    },
    "required": ["id", "status", "customer", "items"],
    "additionalProperties": False,
}
NESTED_SAMPLE = {
    "id": 1042, "status": "shipped",
    "customer": {"name": "Bob Jones", "email": "bob@example.com"},
    "items": [{"sku": "A-100", "qty": 2}, {"sku": "B-22", "qty": 1}, {"sku": "C-7", "qty": 12}],
}

ANY_OBJECT_SCHEMA = {"type": "object"}  # what response_format {"type": "json_object"} asks for
ANY_SAMPLE = {
    "title": 'Quarterly "Q3" report', "tags": ["finance", "draft"],
    "meta": {"pages": 12, "ratio": 0.75, "final": False, "owner": None},
    "notes": "caf\u00e9 \u2713 line\nbreak",
}

DATE_REGEX = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
EMAIL_REGEX = r"[a-z0-9._%+-]{1,40}@[a-z0-9-]{1,40}(\.[a-z0-9-]{1,40}){0,3}\.[a-z]{2,6}"
CHOICES = ["positive", "negative", "neutral", "mixed"]
EBNF = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


CASES: list[dict] = [
    {"name": "flat_schema", "kind": "json_schema", "spec": FLAT_SCHEMA, "text": _compact(FLAT_SAMPLE), "bad": "a"},
    {"name": "nested_schema", "kind": "json_schema", "spec": NESTED_SCHEMA, "text": _compact(NESTED_SAMPLE), "bad": "a"},
    {"name": "any_json_object", "kind": "any_json", "spec": ANY_OBJECT_SCHEMA, "text": _compact(ANY_SAMPLE), "bad": "a"},
    {"name": "regex_iso_date", "kind": "regex", "spec": DATE_REGEX, "text": "2024-02-29", "bad": "a"},
    {"name": "regex_email", "kind": "regex", "spec": EMAIL_REGEX, "text": "john.doe42@mail.example.com", "bad": "@"},
    {"name": "choice_4", "kind": "choice", "spec": CHOICES, "text": "neutral", "bad": "a"},
    {"name": "ebnf_arith", "kind": "ebnf", "spec": EBNF, "text": "(12+3)*4-56/7", "bad": "a"},
]
JSON_CASES = ("flat_schema", "nested_schema", "any_json_object")

BAD_INPUTS: list[tuple[str, str, Any]] = [
    ("schema_not_json", "json_schema", '{"type": "object", "properties": '),
    ("schema_unknown_type", "json_schema", {"type": "strin"}),
    ("schema_not_keyword", "json_schema",
     {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]}),
    ("schema_remote_ref", "json_schema", {"$ref": "https://example.com/schemas/person.json"}),
    ("schema_pattern_lookahead", "json_schema", {"type": "string", "pattern": "^(?=a)a+$"}),
    ("schema_min_gt_max", "json_schema", {"type": "string", "minLength": 5, "maxLength": 2}),
    ("schema_allof_contradiction", "json_schema", {"allOf": [{"type": "string"}, {"type": "integer"}]}),
    ("schema_empty_enum", "json_schema", {"enum": []}),
    ("regex_unbalanced", "regex", "([a-z]+"),
    ("regex_backreference", "regex", r"(a+)\1"),
    ("regex_lookahead", "regex", r"(?=ab)a\w"),
    ("regex_empty_language", "regex", r"x[^\s\S]"),
    ("ebnf_undefined_rule", "ebnf", 'root ::= "a" | missing_rule\n'),
    ("ebnf_syntax_error", "ebnf", 'root ::= ("a" | "b"\n'),
]


class Unsupported(Exception):
    """The library has no way to express this kind of grammar."""


# ---------------------------------------------------------------------------------------------
# Byte-level vocabulary (GPT-2 style) for outlines-core and the reduced-vocabulary test

def token_bytes(tokenizer, vocab_size: int) -> tuple[list[bytes | None], set[int]]:
    """id -> raw bytes of the token (None for special/added tokens), and the special ids."""
    dec = _byte_decoder()                                   # GPT-2's byte-level text -> bytes
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    out: list[bytes | None] = [None] * vocab_size
    for s, i in tokenizer.get_vocab().items():
        if i >= vocab_size or i in special:
            continue
        out[i] = bytes(dec[c] for c in s)
    return out, special


# ---------------------------------------------------------------------------------------------
# Library adapters. fill() writes one row of an int32 [B, ceil(V/32)] CPU bitmask tensor.

class XGrammar:
    name = "xgrammar"
    dist = "xgrammar"

    def __init__(self) -> None:
        import xgrammar as xgr
        self.xgr = xgr

    def setup(self, tokenizer, vocab_size: int) -> None:
        # from_huggingface keeps added/control tokens (<|im_start|>, <repo_name>, ...) as ordinary
        # text, so a JSON string may contain them. Rebuild the info with their strings blanked:
        # xgrammar then detects them as special and never allows them (EOS stays a stop token).
        t0 = pc()
        self.info_hf = self.xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.setup_extra = {"from_huggingface_s": round(pc() - t0, 3)}
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        encoded = [""] * vocab_size
        for s, i in tokenizer.get_vocab().items():
            if i < vocab_size and i not in special:
                encoded[i] = s
        self.info = self.xgr.TokenizerInfo.from_vocab_and_metadata(encoded, self.info_hf.dump_metadata())
        self.setup_extra["special_token_ids"] = len(self.info.special_token_ids)
        self.setup_extra["stop_token_ids"] = list(self.info.stop_token_ids)
        self.threads = os.cpu_count() or 1
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        self.batcher = self.xgr.BatchGrammarMatcher(max_threads=self.threads)

    def compile(self, kind: str, spec: Any, compiler=None):
        c = compiler or self.compiler
        if kind == "json_schema":
            return c.compile_json_schema(spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "any_json":  # strict_mode=False: unlisted properties allowed (strict is the default)
            return c.compile_json_schema(json.dumps(spec), strict_mode=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
        if kind == "ebnf":
            return c.compile_grammar(spec)
        raise Unsupported(kind)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def accept(self, m, tok: int) -> bool:
        return m.accept_token(tok)

    def terminated(self, m) -> bool:
        return m.is_terminated()

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def reset(self, m) -> None:
        m.reset()

    def error_state(self, m) -> str | None:
        return None  # no error state: a rejected token leaves the matcher unchanged

    def batch_fill(self, ms, bitmask) -> None:
        self.batcher.batch_fill_next_token_bitmask(ms, bitmask)

    def batch_accept(self, ms, toks) -> list[bool]:
        return self.xgr.BatchGrammarMatcher.batch_accept_token(ms, toks)

    def first_mask_extra(self, compiled) -> dict:
        return {"compiled_bytes": compiled.memory_size_bytes}


class LLGuidance:
    name = "llguidance"
    dist = "llguidance"

    def __init__(self) -> None:
        import llguidance
        import llguidance.hf
        self.llg = llguidance
        self.hf = llguidance.hf

    def setup(self, tokenizer, vocab_size: int) -> None:
        self.tok = self.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.threads = os.cpu_count() or 1
        self.executor = self.llg.LLExecutor(num_threads=self.threads)

    def grammar(self, kind: str, spec: Any) -> str:
        g = self.llg.grammar_from
        if kind in ("json_schema", "any_json"):
            return g("json_schema", spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "regex":
            return g("regex", spec)
        if kind == "choice":
            return g("choice", json.dumps(spec))
        if kind == "ebnf":
            return g("gbnf", spec)
        raise Unsupported(kind)

    def compile(self, kind: str, spec: Any, tok=None):
        """The 'compiled grammar' is a template matcher that requests deep_copy()."""
        m = self.llg.LLMatcher(tok or self.tok, self.grammar(kind, spec), log_level=0)
        if m.is_error():
            raise LLGuidanceGrammarError(m.get_error())
        return m

    def matcher(self, template):
        return template.deep_copy()

    def fill(self, m, bitmask, row: int) -> None:
        w = bitmask.shape[1]
        m.unsafe_compute_mask_ptr(bitmask.data_ptr() + row * w * 4, w * 4)

    def accept(self, m, tok: int) -> bool:
        return m.consume_token(tok)

    def terminated(self, m) -> bool:
        return m.is_stopped()

    def rollback(self, m, n: int) -> None:
        m.rollback(n)

    def reset(self, m) -> None:
        m.reset()

    def error_state(self, m) -> str | None:
        # get_error() appends a verbose <state>...</state><grammar>...</grammar> dump (LLParserLimits(
        # verbose_errors=False) replaces the whole message by "<non-verbose/>"); keep the first part.
        return m.get_error().split("\n<state>")[0] if m.is_error() else None

    def batch_fill(self, ms, bitmask) -> None:
        b, w = bitmask.shape
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], bitmask.data_ptr(), w * 4, b)

    def batch_accept(self, ms, toks) -> list[bool]:
        return self.executor.consume_token_par(list(zip(ms, toks)))

    def first_mask_extra(self, compiled) -> dict:
        return {}


class LLGuidanceGrammarError(ValueError):
    """Stands for LLMatcher.is_error() after construction (the constructor itself never raises)."""


class OutlinesCore:
    name = "outlines-core"
    dist = "outlines-core"

    def __init__(self) -> None:
        import outlines_core
        self.oc = outlines_core

    def setup(self, tokenizer, vocab_size: int) -> None:
        toks, _special = token_bytes(tokenizer, vocab_size)
        self.eos = tokenizer.eos_token_id
        self.vocab = self.vocabulary(toks, self.eos)

    def vocabulary(self, toks: list[bytes | None], eos: int):
        m: dict[bytes, list[int]] = {}
        for i, b in enumerate(toks):
            if b is not None and i != eos:
                m.setdefault(b, []).append(i)
        return self.oc.Vocabulary(eos, m)

    def regex(self, kind: str, spec: Any) -> str:
        if kind in ("json_schema", "any_json"):
            return self.oc.json_schema.build_regex_from_schema(spec if isinstance(spec, str) else json.dumps(spec))
        if kind == "regex":
            return spec
        if kind == "choice":
            return "(" + "|".join(re.escape(s) for s in spec) + ")"
        raise Unsupported(f"{kind}: outlines-core compiles regular languages only (regex, JSON schema "
                          "via regex); no context-free grammars")

    def compile(self, kind: str, spec: Any, vocab=None):
        return self.oc.Index(self.regex(kind, spec), vocab or self.vocab)

    def matcher(self, index):
        return self.oc.Guide(index, max_rollback=64)

    def fill(self, m, bitmask, row: int) -> None:
        w = bitmask.shape[1]
        m.write_mask_into(bitmask.data_ptr() + row * w * 4, w, 4)

    def accept(self, m, tok: int) -> bool:
        # Guide.advance(EOS) raises in a final state although the mask allows EOS there
        # (dottxt-ai/outlines-core#227); outlines itself stops instead of advancing. Do the same.
        if tok == self.eos and m.is_finished():
            return True
        try:
            m.advance(tok, return_tokens=False)
            return True
        except ValueError:
            return False

    def terminated(self, m) -> bool:
        return m.is_finished()

    def rollback(self, m, n: int) -> None:
        m.rollback_state(n)

    def reset(self, m) -> None:
        m.reset()

    def error_state(self, m) -> str | None:
        return None

    batch_fill = None  # no batched mask API
    batch_accept = None

    def first_mask_extra(self, compiled) -> dict:
        return {}


# ---------------------------------------------------------------------------------------------
# Helpers

def stats_us(xs: list[float]) -> dict:
    if not xs:
        return {}
    s = sorted(xs)
    p99 = s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]
    return {"n": len(s), "median_us": round(statistics.median(s) * 1e6, 2),
            "p99_us": round(p99 * 1e6, 2), "max_us": round(s[-1] * 1e6, 2)}


def allowed(bm_np: np.ndarray, row: int, tok: int) -> bool:
    return bool((int(bm_np[row, tok >> 5]) >> (tok & 31)) & 1)


def popcount(row: np.ndarray, vocab_size: int) -> int:
    return int(np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size].sum())


def exc_info(e: BaseException) -> dict:
    t = type(e)
    mod = "" if t.__module__ in ("builtins", "__main__", __name__) else t.__module__ + "."
    return {"type": mod + t.__qualname__, "message": str(e).split("\n<state>")[0].strip()[:400]}


def alloc(batch: int, vocab_size: int):
    import torch
    return torch.zeros((batch, (vocab_size + 31) // 32), dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Measurements

def measure_compile(lib, case: dict, max_reps: int = 3, budget_s: float = 2.0) -> dict:
    times, handle = [], None
    for _ in range(max_reps):
        t0 = pc()
        handle = lib.compile(case["kind"], case["spec"])
        times.append(pc() - t0)
        if sum(times) > budget_s:
            break
    return {"compile_ms_first": round(times[0] * 1e3, 3),
            "compile_ms_median": round(statistics.median(times) * 1e3, 3), "compile_reps": len(times),
            "_handle": handle}


def walk(lib, m, ids: list[int], vocab_size: int, bitmask, keep_masks: bool = False) -> dict:
    """Fill, check, accept each token of ids (the last one is EOS). Returns timings and checks."""
    bm_np = bitmask.numpy()
    mask_t, acc_t, masks, counts = [], [], [], []
    disallowed, rejected = [], []
    for i, t in enumerate(ids):
        t0 = pc()
        lib.fill(m, bitmask, 0)
        t1 = pc()
        if not allowed(bm_np, 0, t):
            disallowed.append(i)
        if keep_masks:
            masks.append(bm_np[0].copy())
            counts.append(popcount(bm_np[0], vocab_size))
        t2 = pc()
        ok = lib.accept(m, t)
        t3 = pc()
        if not ok:
            rejected.append(i)
            break
        mask_t.append(t1 - t0)
        acc_t.append(t3 - t2)
    return {"mask_t": mask_t, "accept_t": acc_t, "masks": masks, "counts": counts,
            "disallowed_steps": disallowed, "rejected_steps": rejected,
            "terminated": lib.terminated(m)}


def case_run(lib, case: dict, ids: list[int], vocab_size: int, bad_tok: int, reps: int) -> dict:
    res: dict[str, Any] = {}
    try:
        c = measure_compile(lib, case)
    except Unsupported as e:
        return {"unsupported": str(e)}
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return {"compile_error": exc_info(e)}
    handle = c.pop("_handle")
    res.update(c)
    res.update(lib.first_mask_extra(handle))
    bitmask = alloc(1, vocab_size)
    # new request: matcher + first mask
    t0 = pc()
    m = lib.matcher(handle)
    t1 = pc()
    lib.fill(m, bitmask, 0)
    t2 = pc()
    res["new_matcher_us"] = round((t1 - t0) * 1e6, 2)
    res["first_mask_us"] = round((t2 - t1) * 1e6, 2)
    res["time_to_first_mask_ms"] = round(res["compile_ms_first"] + (t2 - t0) * 1e3, 3)
    # cold walk (same matcher: its first mask is already computed, refill it)
    w = walk(lib, m, ids, vocab_size, bitmask, keep_masks=True)
    res["tokens"] = len(ids)
    res["cold"] = {"mask": stats_us(w["mask_t"]), "total_mask_ms": round(sum(w["mask_t"]) * 1e3, 3)}
    res["correct"] = {"all_valid_tokens_allowed": not w["disallowed_steps"] and not w["rejected_steps"],
                      "disallowed_steps": w["disallowed_steps"][:10], "rejected_steps": w["rejected_steps"][:10],
                      "terminated_after_eos": w["terminated"]}
    res["allowed_tokens_per_step"] = {"min": min(w["counts"]), "median": int(statistics.median(w["counts"])),
                                      "max": max(w["counts"])} if w["counts"] else {}
    res["_masks"] = w["masks"]
    # warm walks: fresh matchers from the compiled grammar
    mask_t, acc_t, ok = [], [], True
    for _ in range(reps):
        m = lib.matcher(handle)
        w = walk(lib, m, ids, vocab_size, bitmask)
        ok = ok and not w["disallowed_steps"] and not w["rejected_steps"] and w["terminated"]
        mask_t += w["mask_t"]
        acc_t += w["accept_t"]
    res["warm"] = {"mask": stats_us(mask_t), "accept": stats_us(acc_t),
                   "mask_plus_accept_median_us": round((statistics.median(mask_t) + statistics.median(acc_t)) * 1e6, 2)}
    res["correct"]["warm_walks_ok"] = ok
    # wrong first token
    m = lib.matcher(handle)
    lib.fill(m, bitmask, 0)
    bad = {"token_id": bad_tok, "masked_out": not allowed(bitmask.numpy(), 0, bad_tok)}
    try:
        bad["accept_returned"] = lib.accept(m, bad_tok)
    except Exception as e:  # noqa: BLE001
        bad["accept_raised"] = exc_info(e)
    bad["error_state_after"] = lib.error_state(m)
    try:
        lib.fill(m, bitmask, 0)
        bad["first_valid_token_still_allowed"] = allowed(bitmask.numpy(), 0, ids[0])
    except Exception as e:  # noqa: BLE001
        bad["refill_raised"] = exc_info(e)
    res["wrong_first_token"] = bad
    # rollback
    if len(ids) >= 6:
        m = lib.matcher(handle)
        k = len(ids) // 2
        before = None
        for i in range(k):
            if i == k - 3:
                lib.fill(m, bitmask, 0)
                before = bitmask.numpy()[0].copy()
            lib.accept(m, ids[i])
        try:
            lib.rollback(m, 3)
            lib.fill(m, bitmask, 0)
            same = bool(np.array_equal(before, bitmask.numpy()[0]))
            for t in ids[k - 3:]:
                lib.accept(m, t)
            res["correct"]["rollback3_restores_mask"] = same
            res["correct"]["rollback_then_finish_terminated"] = lib.terminated(m)
        except Exception as e:  # noqa: BLE001
            res["correct"]["rollback_error"] = exc_info(e)
    return res


def batch_run(lib, handles: dict, seqs: dict, vocab_size: int, batch: int, steps: int) -> dict:
    """Rows cycle through the JSON cases, row r starting r//3 tokens in; a finished row restarts."""
    names = [n for n in JSON_CASES if n in handles]
    if not names:
        return {"skipped": "no JSON case compiled"}
    rows = [names[r % len(names)] for r in range(batch)]
    out: dict[str, Any] = {"rows": batch, "cases": names}
    modes = (["batched"] if lib.batch_fill else []) + ["loop"]
    for mode in modes:
        ms = [lib.matcher(handles[n]) for n in rows]
        pos = [0] * batch
        for r in range(batch):
            for _ in range(r // len(names)):
                lib.accept(ms[r], seqs[rows[r]][pos[r]])
                pos[r] += 1
        bitmask = alloc(batch, vocab_size)
        bm_np = bitmask.numpy()
        fill_t, acc_t, bad = [], [], 0
        for _ in range(steps):
            t0 = pc()
            if mode == "batched":
                lib.batch_fill(ms, bitmask)
            else:
                for r in range(batch):
                    lib.fill(ms[r], bitmask, r)
            t1 = pc()
            toks = [seqs[rows[r]][pos[r]] for r in range(batch)]
            bad += sum(not allowed(bm_np, r, toks[r]) for r in range(batch))
            t2 = pc()
            if mode == "batched" and lib.batch_accept:
                oks = lib.batch_accept(ms, toks)
            else:
                oks = [lib.accept(ms[r], toks[r]) for r in range(batch)]
            t3 = pc()
            bad += sum(not o for o in oks)
            fill_t.append(t1 - t0)
            acc_t.append(t3 - t2)
            for r in range(batch):
                pos[r] += 1
                if pos[r] == len(seqs[rows[r]]):
                    lib.reset(ms[r])
                    pos[r] = 0
        out[mode] = {"fill_per_step": stats_us(fill_t), "accept_per_step": stats_us(acc_t),
                     "violations": bad}
    return out


def compare_masks(ref: list, mine: list, ids: list[int], tokenizer, special: set[int], vocab_size: int) -> dict:
    """Step by step: where the two allowed sets differ, and an example of each direction."""
    n = min(len(ref), len(mine))
    eq, more_ref, more_me, special_only_ref = 0, 0, 0, 0
    ex_ref = ex_me = None

    def example(i, d):
        return {"step": i, "after": tokenizer.decode(ids[:i])[-24:], "count": int(len(d)),
                "tokens": [tokenizer.convert_ids_to_tokens(int(j)) for j in d[:8]]}
    for i in range(n):
        a = np.unpackbits(ref[i].view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        b = np.unpackbits(mine[i].view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        d1, d2 = np.nonzero(a & ~b)[0], np.nonzero(b & ~a)[0]
        if not len(d1) and not len(d2):
            eq += 1
            continue
        if len(d1):
            more_ref += 1
            only_special = set(d1.tolist()) <= special
            special_only_ref += only_special
            if ex_ref is None or (ex_ref[1] and not only_special):
                ex_ref = (example(i, d1), only_special)
        if len(d2):
            more_me += 1
            if ex_me is None:
                ex_me = example(i, d2)
    return {"equal_steps": f"{eq}/{n}",
            "steps_xgrammar_allows_more": more_ref,
            "of_which_only_special_tokens": special_only_ref,
            "example_xgrammar_only": ex_ref[0] if ex_ref else None,
            "steps_this_allows_more": more_me, "example_this_only": ex_me}


def semantics(libs: dict, tokenizer, vocab_size: int) -> dict:
    """Small behaviour probes that matter for a server, each walked like the cases above."""
    eos = tokenizer.eos_token_id
    out: dict[str, Any] = {}
    probes = {
        "alternation_bounded_branch_first": ("regex", r"[a-z]{2,6}|[a-z]+", "example"),
        "alternation_unbounded_branch_first": ("regex", r"[a-z]+|[a-z]{2,6}", "example"),
        "backslash_d_matches_arabic_indic_digit": ("regex", r"\d", "\u0663"),
        "schema_pattern_backslash_d_arabic_indic": ("json_schema", {"type": "string", "pattern": "^\\d$"},
                                                    '"\u0663"'),
    }
    for pname, (kind, spec, text) in probes.items():
        ids = tokenizer.encode(text, add_special_tokens=False) + [eos]
        out[pname] = {"spec": spec if isinstance(spec, str) else json.dumps(spec), "text": text}
        for name, lib in libs.items():
            try:
                m = lib.matcher(lib.compile(kind, spec))
                w = walk(lib, m, ids, vocab_size, alloc(1, vocab_size))
                bad = w["disallowed_steps"] + w["rejected_steps"]
                out[pname][name] = "accepted" if not bad and w["terminated"] else \
                    f"rejected at token {bad[0] if bad else len(ids)} of {len(ids)}"
            except Exception as e:  # noqa: BLE001
                out[pname][name] = exc_info(e)
    # special (added/control) tokens allowed inside a JSON string
    _, special = token_bytes(tokenizer, vocab_size)
    prefix = tokenizer.encode('{"name":"', add_special_tokens=False)
    out["special_tokens_allowed_inside_json_string"] = {"after": '{"name":"'}
    for name, lib in libs.items():
        try:
            m = lib.matcher(lib.compile("json_schema", FLAT_SCHEMA))
            for t in prefix:
                lib.accept(m, t)
            bm = alloc(1, vocab_size)
            lib.fill(m, bm, 0)
            ids = [i for i in sorted(special) if allowed(bm.numpy(), 0, i)]
            out["special_tokens_allowed_inside_json_string"][name] = {
                "count": len(ids), "tokens": [tokenizer.convert_ids_to_tokens(i) for i in ids[:6]]}
        except Exception as e:  # noqa: BLE001
            out["special_tokens_allowed_inside_json_string"][name] = exc_info(e)
    if "xgrammar" in libs:
        xg = libs["xgrammar"]
        comp = xg.xgr.GrammarCompiler(xg.info_hf, max_threads=1, cache_enabled=False)
        m = xg.matcher(xg.compile("json_schema", FLAT_SCHEMA, compiler=comp))
        for t in prefix:
            m.accept_token(t)
        bm = alloc(1, vocab_size)
        m.fill_next_token_bitmask(bm)
        out["special_tokens_allowed_inside_json_string"]["xgrammar_with_plain_from_huggingface_info"] = {
            "count": sum(allowed(bm.numpy(), 0, i) for i in special)}
    if "outlines-core" in libs:
        oc = libs["outlines-core"]
        g = oc.matcher(oc.compile("regex", DATE_REGEX))
        for t in tokenizer.encode("2024-02-29", add_special_tokens=False):
            g.advance(t, return_tokens=False)
        r = {"is_finished": g.is_finished(), "eos_in_allowed_tokens": eos in g.get_tokens()}
        try:
            g.advance(eos, return_tokens=False)
            r["advance_eos"] = "ok"
        except Exception as e:  # noqa: BLE001
            r["advance_eos"] = exc_info(e)
        out["outlines_core_raw_advance_eos_in_final_state"] = r
    return out


def apply_mask_bench(vocab_size: int, batches=(1, 16), iters: int = 100) -> dict:
    import torch
    import xgrammar as xgr
    shifts = torch.arange(32, dtype=torch.int32)

    def torch_unpack(logits, bitmask):
        b, v = logits.shape
        bits = (bitmask.unsqueeze(-1) >> shifts) & 1
        logits.masked_fill_(bits.view(b, -1)[:, :v] == 0, float("-inf"))

    out = {"torch_threads_default": torch.get_num_threads()}
    g = torch.Generator().manual_seed(0)
    for b, nthreads in [(b, t) for b in batches for t in sorted({torch.get_num_threads(), 1}, reverse=True)]:
        torch.set_num_threads(nthreads)
        logits = torch.randn(b, vocab_size, generator=g)
        bitmask = torch.randint(-2**31, 2**31 - 1, (b, (vocab_size + 31) // 32), dtype=torch.int32, generator=g)
        ref = logits.clone()
        torch_unpack(ref, bitmask)
        chk = logits.clone()
        xgr.apply_token_bitmask_inplace(chk, bitmask)
        res = {"xgrammar_cpu_equals_torch_unpack": bool(torch.equal(ref, chk))}
        for name, fn in (("xgrammar_cpu_kernel", lambda l, m: xgr.apply_token_bitmask_inplace(l, m)),
                         ("torch_unpack", torch_unpack)):
            ts = []
            work = logits.clone()
            for _ in range(iters):
                t0 = pc()
                fn(work, bitmask)
                ts.append(pc() - t0)
            res[name] = stats_us(ts)
        out[f"B{b}_threads{nthreads}"] = res
    torch.set_num_threads(out["torch_threads_default"])
    return out


class CaptureFd2:
    """Collect what native code writes to file descriptor 2 (xgrammar logs warnings there)."""

    def __enter__(self):
        import tempfile
        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode("utf-8", "replace").strip()
        self.tmp.close()
        return False


def error_run(lib, kind: str, spec: Any, vocab_size: int, compile_fn: Callable | None = None) -> dict:
    cap = CaptureFd2()
    try:
        with cap:
            h = (compile_fn or lib.compile)(kind, spec)
    except Unsupported as e:
        return {"unsupported": str(e)[:200]}
    except Exception as e:  # noqa: BLE001
        return {"phase": "compile", **exc_info(e)}
    out: dict[str, Any] = {"phase": "none (compiled)"}
    if cap.text:
        out["stderr_warnings"] = [re.sub(r"^\[[0-9:]+\] ", "", ln)[:200] for ln in cap.text.splitlines()][:3]
    try:
        m = lib.matcher(h)
        bitmask = alloc(1, vocab_size)
        lib.fill(m, bitmask, 0)
        out["first_mask_allowed"] = popcount(bitmask.numpy()[0], vocab_size)
        if out["first_mask_allowed"] <= 5 and TOKENIZER is not None:
            row = np.unpackbits(bitmask.numpy()[0].view(np.uint8), bitorder="little")[:vocab_size]
            out["allowed_tokens"] = [TOKENIZER.convert_ids_to_tokens(int(i)) for i in np.nonzero(row)[0]]
        out["terminated"] = lib.terminated(m)
        err = lib.error_state(m)
        if err:
            out["phase"] = "first mask (matcher error state)"
            out["error_state"] = err[:400]
        elif out["first_mask_allowed"] == 0 or (out["first_mask_allowed"] == 1 and allowed(bitmask.numpy(), 0, EOS_ID)):
            out["phase"] = "first mask (nothing or only EOS allowed)"
    except Exception as e:  # noqa: BLE001
        out["phase"] = "matcher/first mask"
        out.update(exc_info(e))
    return out


EOS_ID = 2
TOKENIZER = None


RV_REGEX, RV_CONTROL = "[0-9]{4}", "[a-z]{4}"


def reduced_vocab_test(libs: dict, tokenizer, vocab_size: int) -> dict:
    """Vocabulary without any token containing an ASCII digit; grammar: exactly 4 ASCII digits
    ([0-9], not \\d: Rust-regex \\d in llguidance/outlines-core is Unicode). Control: [a-z]{4}."""
    toks, special = token_bytes(tokenizer, vocab_size)
    removed = {i for i, b in enumerate(toks) if b is not None and any(48 <= c <= 57 for c in b)}
    out: dict[str, Any] = {"removed_tokens": len(removed), "regex": RV_REGEX, "control_regex": RV_CONTROL}
    if "xgrammar" in libs:
        xg = libs["xgrammar"]
        try:
            vocab = [b"" if (b is None or i in removed) else b for i, b in enumerate(toks)]
            for i in special:
                tok_str = tokenizer.convert_ids_to_tokens(i)
                vocab[i] = tok_str.encode() if i == EOS_ID else b""
            info = xg.xgr.TokenizerInfo(vocab, xg.xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[EOS_ID])
            comp = xg.xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            out["xgrammar"] = error_run(xg, "regex", RV_REGEX, vocab_size,
                                        compile_fn=lambda k, s: xg.compile(k, s, compiler=comp))
            out["xgrammar"]["control"] = error_run(xg, "regex", RV_CONTROL, vocab_size,
                                                   compile_fn=lambda k, s: xg.compile(k, s, compiler=comp))
            out["xgrammar"]["special_token_ids_in_reduced_info"] = len(info.special_token_ids)
        except Exception as e:  # noqa: BLE001
            out["xgrammar"] = {"setup_error": exc_info(e)}
    if "llguidance" in libs:
        lg = libs["llguidance"]

        class _Tok:
            eos_token_id = EOS_ID
            bos_token_id = tokenizer.bos_token_id
            special_token_ids = sorted(special | removed)
            tokens = [(tokenizer.convert_ids_to_tokens(i).encode() if b is None else
                       (b"<|removed_%d|>" % i if i in removed else b)) for i, b in enumerate(toks)]

            def __call__(self, s):
                ids = tokenizer.encode(s.decode("utf-8", "replace") if isinstance(s, bytes) else s,
                                       add_special_tokens=False)
                return [i for i in ids if i not in removed]
        try:
            ltok = lg.llg.LLTokenizer(lg.llg.TokenizerWrapper(_Tok()), n_vocab=vocab_size)
            out["llguidance"] = error_run(lg, "regex", RV_REGEX, vocab_size,
                                          compile_fn=lambda k, s: lg.compile(k, s, tok=ltok))
            out["llguidance"]["control"] = error_run(lg, "regex", RV_CONTROL, vocab_size,
                                                     compile_fn=lambda k, s: lg.compile(k, s, tok=ltok))
        except Exception as e:  # noqa: BLE001
            out["llguidance"] = {"setup_error": exc_info(e)}
    if "outlines-core" in libs:
        oc = libs["outlines-core"]
        try:
            vocab = oc.vocabulary([None if i in removed else b for i, b in enumerate(toks)], EOS_ID)
            out["outlines-core"] = error_run(oc, "regex", RV_REGEX, vocab_size,
                                             compile_fn=lambda k, s: oc.compile(k, s, vocab=vocab))
            out["outlines-core"]["control"] = error_run(oc, "regex", RV_CONTROL, vocab_size,
                                                        compile_fn=lambda k, s: oc.compile(k, s, vocab=vocab))
        except Exception as e:  # noqa: BLE001
            out["outlines-core"] = {"setup_error": exc_info(e)}
    return out


def gil_test(lib, kind: str, spec: Any, vocab_size: int) -> dict:
    """Compile (+ first mask) in a thread; the main thread spins and records its longest stall and
    the sum of its stalls over 2 ms. A compile holding the GIL shows a stall as long as itself;
    stalls of a few ms are the interpreter's 5 ms switch interval and CPU sharing (2 cores).
    lib=None: the thread only sleeps 0.3 s (baseline for this machine's noise)."""
    done = {}

    def work():
        t0 = pc()
        try:
            if lib is None:
                time.sleep(0.3)
            else:
                h = lib.compile(kind, spec)
                m = lib.matcher(h)
                lib.fill(m, alloc(1, vocab_size), 0)
        except Exception as e:  # noqa: BLE001
            done["error"] = exc_info(e)
        done["ms"] = (pc() - t0) * 1e3

    th = threading.Thread(target=work)
    last = pc()
    gaps = []
    th.start()
    while th.is_alive():
        now = pc()
        gaps.append(now - last)
        last = now
        sum(range(50))
    th.join()
    return {"compile_plus_first_mask_ms_in_thread": round(done["ms"], 2),
            "main_thread_longest_stall_ms": round(max(gaps) * 1e3, 2) if gaps else 0.0,
            "main_thread_stalled_ms_total": round(sum(g for g in gaps if g > 0.002) * 1e3, 1),
            "main_thread_iterations": len(gaps), **({"error": done["error"]} if "error" in done else {})}


def concurrent_test(lib, vocab_size: int) -> dict:
    """Two threads compile different grammars with the same compiler/tokenizer at once."""
    results, errors = {}, []

    def work(name, kind, spec):
        try:
            results[name] = lib.compile(kind, spec)
        except Exception as e:  # noqa: BLE001
            errors.append(exc_info(e))

    ths = [threading.Thread(target=work, args=("date", "regex", DATE_REGEX)),
           threading.Thread(target=work, args=("flat", "json_schema", FLAT_SCHEMA))]
    t0 = pc()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    return {"ok": not errors and len(results) == 2, "errors": errors, "wall_ms": round((pc() - t0) * 1e3, 2)}


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="warm walks per case (default 5)")
    ap.add_argument("--batch", type=int, default=16, help="rows in the batch test (default 16)")
    ap.add_argument("--batch-steps", type=int, default=150, help="decode steps in the batch test")
    ap.add_argument("--libs", default="xgrammar,llguidance,outlines-core",
                    help="comma-separated subset of xgrammar,llguidance,outlines-core")
    ap.add_argument("--json", metavar="PATH", help="also write the report here")
    args = ap.parse_args(argv)

    t_start = pc()
    report: dict[str, Any] = {"benchmark": "bench_grammar", "cpu_count": os.cpu_count(),
                              "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                              "note": "wall-clock timings; other processes may share the CPUs (see loadavg)"}
    import torch
    log("loading the default model (tokenizer)")
    from server.engine.loader import load_model
    loaded = load_model(None)
    tokenizer, vocab_size = loaded.tokenizer, loaded.config.vocab_size
    global EOS_ID, TOKENIZER
    EOS_ID, TOKENIZER = tokenizer.eos_token_id, tokenizer
    report["model"] = {"source": os.path.basename(loaded.source), "vocab_size": vocab_size,
                       "tokenizer_class": type(tokenizer).__name__, "eos_token_id": EOS_ID}
    vers = {"torch": torch.__version__}
    for d in ("transformers", "xgrammar", "llguidance", "outlines-core"):
        try:
            vers[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            vers[d] = None
    report["versions"] = vers

    wanted = [s.strip() for s in args.libs.split(",") if s.strip()]
    classes = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}
    libs: dict[str, Any] = {}
    report["setup_s"], report["import_error"] = {}, {}
    for name in wanted:
        try:
            lib = classes[name]()
            t0 = pc()
            lib.setup(tokenizer, vocab_size)
            report["setup_s"][name] = round(pc() - t0, 3)
            if getattr(lib, "setup_extra", None):
                report.setdefault("setup_detail", {})[name] = lib.setup_extra
            libs[name] = lib
            log(f"{name}: tokenizer set-up {report['setup_s'][name]} s")
        except Exception as e:  # noqa: BLE001
            report["import_error"][name] = exc_info(e)
            log(f"{name}: unavailable: {e}")

    seqs = {c["name"]: tokenizer.encode(c["text"], add_special_tokens=False) + [EOS_ID] for c in CASES}
    report["cases"] = {c["name"]: {"kind": c["kind"], "text": c["text"], "tokens": len(seqs[c["name"]])}
                       for c in CASES}
    results: dict[str, dict] = {n: {} for n in libs}
    handles: dict[str, dict] = {n: {} for n in libs}
    for case in CASES:
        for name, lib in libs.items():
            log(f"{case['name']}: {name}")
            try:
                r = case_run(lib, case, seqs[case["name"]], vocab_size,
                             tokenizer.convert_tokens_to_ids(case["bad"]), args.reps)
            except Exception as e:  # noqa: BLE001
                r = {"run_error": exc_info(e), "traceback": traceback.format_exc()[-800:]}
            results[name][case["name"]] = r
    # mask agreement with xgrammar (first walk, step by step)
    _, special = token_bytes(tokenizer, vocab_size)
    if "xgrammar" in results:
        for name in results:
            for cname, r in results[name].items():
                ref = results["xgrammar"].get(cname, {}).get("_masks")
                mine = r.get("_masks")
                if ref and mine and name != "xgrammar":
                    r["masks_vs_xgrammar"] = compare_masks(ref, mine, seqs[cname], tokenizer, special, vocab_size)
    for name in results:
        for r in results[name].values():
            r.pop("_masks", None)
    report["per_case"] = results

    # xgrammar with enable_dynamic_compilation=True (token-mask cache built on first use)
    if "xgrammar" in libs:
        import copy
        xg = copy.copy(libs["xgrammar"])
        xg.compiler = xg.xgr.GrammarCompiler(xg.info, max_threads=xg.threads, cache_enabled=False,
                                             enable_dynamic_compilation=True)
        dyn = {}
        for case in CASES:
            log(f"{case['name']}: xgrammar dynamic compilation")
            try:
                r = case_run(xg, case, seqs[case["name"]], vocab_size,
                             tokenizer.convert_tokens_to_ids(case["bad"]), max(2, args.reps // 2))
                dyn[case["name"]] = {k: r.get(k) for k in ("compile_ms_first", "compile_ms_median",
                                                           "first_mask_us", "time_to_first_mask_ms")}
                dyn[case["name"]]["cold_mask"] = r["cold"]["mask"]
                dyn[case["name"]]["warm_mask"] = r["warm"]["mask"]
                dyn[case["name"]]["correct"] = r["correct"]["all_valid_tokens_allowed"] and r["correct"]["warm_walks_ok"]
            except Exception as e:  # noqa: BLE001
                dyn[case["name"]] = {"run_error": exc_info(e)}
        report["xgrammar_dynamic_compilation"] = dyn

    # handles for the batch test (fresh compiles, cache off for xgrammar anyway)
    report["batch"] = {}
    for name, lib in libs.items():
        log(f"batch {args.batch}: {name}")
        hs = {}
        for c in CASES:
            if c["name"] in JSON_CASES and "compile_ms_first" in results[name].get(c["name"], {}):
                hs[c["name"]] = lib.compile(c["kind"], c["spec"])
        try:
            report["batch"][name] = batch_run(lib, hs, seqs, vocab_size, args.batch, args.batch_steps)
        except Exception as e:  # noqa: BLE001
            report["batch"][name] = {"run_error": exc_info(e), "traceback": traceback.format_exc()[-800:]}

    if "xgrammar" in libs:
        log("applying bitmasks to logits")
        report["apply_mask_cpu"] = apply_mask_bench(vocab_size)

    log("error reporting")
    report["errors"] = {}
    for bname, kind, spec in BAD_INPUTS:
        report["errors"][bname] = {"kind": kind, "spec": spec if isinstance(spec, str) else json.dumps(spec)}
        for name, lib in libs.items():
            try:
                report["errors"][bname][name] = error_run(lib, kind, spec, vocab_size)
            except Exception as e:  # noqa: BLE001
                report["errors"][bname][name] = {"run_error": exc_info(e)}
    log("reduced vocabulary (no digit tokens)")
    report["errors"]["vocabulary_cannot_satisfy"] = reduced_vocab_test(libs, tokenizer, vocab_size)

    log("semantics probes")
    report["semantics"] = semantics(libs, tokenizer, vocab_size)

    log("threads")
    report["threads"] = {"baseline_thread_sleeping_300ms": gil_test(None, "", None, vocab_size)}
    for name, lib in libs.items():
        report["threads"][name] = {
            "background_compile_nested_schema": gil_test(lib, "json_schema", NESTED_SCHEMA, vocab_size),
            "background_compile_email_regex": gil_test(lib, "regex", EMAIL_REGEX, vocab_size),
            "two_compiles_at_once": concurrent_test(lib, vocab_size)}

    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(pc() - t_start, 1)
    log(f"done in {report['wall_s']} s")
    from benchmarks.report import emit
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
