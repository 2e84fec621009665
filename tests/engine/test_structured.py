"""Structured output in the engine: outputs satisfy their grammar, bad grammars are refused before
scheduling, constrained requests leave their neighbours' greedy outputs unchanged, logit_bias."""

from __future__ import annotations

import json
import re

import pytest

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import Engine
from server.engine.errors import InvalidRequestError
from server.engine.request import FinishReason, GrammarSpec, SamplingParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=128),
                               scheduler=SchedulerConfig(max_model_len=256)))


def run(engine: Engine, grammar: GrammarSpec, seed: int, max_tokens: int = 120, **kw):
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=grammar, **kw)
    return engine.generate(["Hello world"], params)[0]


@pytest.mark.parametrize("seed", range(4))
def test_choice_and_regex_outputs_match(engine, seed):
    choices = ["red", "green", "blue sky"]
    done = run(engine, GrammarSpec("choice", json.dumps(choices)), seed)
    assert done.text in choices and done.finish_reason is FinishReason.STOP
    done = run(engine, GrammarSpec("regex", r"[0-9]{4}-[0-9]{2}"), seed)
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", done.text), done.text


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_output_parses_and_validates(engine, seed):
    done = run(engine, GrammarSpec("json_schema", json.dumps(SCHEMA)), seed, max_tokens=200)
    assert done.finish_reason is FinishReason.STOP, done.text
    value = json.loads(done.text)
    assert set(value) == {"name", "age", "tags"} and 0 <= value["age"] <= 150
    assert isinstance(value["name"], str) and len(value["name"]) <= 8 and set(value["tags"]) <= {"a", "b"}
    done = run(engine, GrammarSpec("json_object"), seed, max_tokens=200)
    assert done.finish_reason is FinishReason.STOP and isinstance(json.loads(done.text), dict)


@pytest.mark.parametrize("spec,needle", [
    (GrammarSpec("json_schema", '{"type": "object", "not": {}}'), "not"),
    (GrammarSpec("json_schema", "{not json"), "the schema is not valid JSON"),
    (GrammarSpec("json_schema", "[1, 2]"), "a JSON schema is an object"),
    (GrammarSpec("regex", "a(b", param="guided_regex"), "unclosed group"),
    (GrammarSpec("json_schema", '{"type": "string", "minLength": 5, "maxLength": 2}'), "nsatisfiable|minLength|no output"),
])
def test_bad_grammars_are_refused_before_scheduling(engine, spec, needle):
    with pytest.raises(InvalidRequestError, match=needle) as err:
        engine.add_request("Hello", SamplingParams(max_tokens=5, grammar=spec))
    assert err.value.param == spec.param and "Traceback" not in str(err.value)
    assert not engine.has_unfinished()


def test_bad_specs_are_refused():
    with pytest.raises(InvalidRequestError, match="unknown grammar kind"):
        GrammarSpec("yaml", "x")
    with pytest.raises(InvalidRequestError, match="must not be empty"):
        GrammarSpec("regex", "")


def test_constrained_requests_leave_greedy_neighbours_unchanged(engine):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "Attention heads"]
    solo = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    ids = [engine.add_request(p, greedy) for p in prompts]
    constrained = [engine.add_request("Hi", SamplingParams(max_tokens=40, seed=i, grammar=GrammarSpec(
        "json_schema", json.dumps(SCHEMA)))) for i in range(3)]
    assert [engine.collect(r).token_ids for r in ids] == solo
    for r in constrained:
        assert engine.collect(r).finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


def test_logit_bias_bans_and_forces(engine):
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    base = engine.generate(["Hello world"], greedy)[0].token_ids
    banned = engine.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                             logit_bias=((base[0], -100.0),)))[0].token_ids
    assert base[0] not in banned
    forced = engine.generate(["Hello world"], SamplingParams(max_tokens=8, temperature=0.9, seed=3, ignore_eos=True,
                                                             logit_bias=((42, 100.0),)))[0].token_ids
    assert set(forced) == {42}
