"""Isolation as a property: requests drawn over the whole parameter space, at its edges, run in
the same batches as fixed greedy "victim" requests; every victim's output equals its solo run,
no victim sees an error, every hostile request is refused cleanly or finishes, and every KV
block comes back. Hypothesis draws the requests; the tiny model runs in CI, the default model
in a slow test."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.config import CacheConfig, EngineConfig, SchedulerConfig
from server.engine.engine import Engine
from server.engine.errors import InvalidRequestError
from server.engine.request import MAX_LOGPROBS, FinishReason, GrammarSpec, SamplingParams

VICTIM_PROMPTS = ["The capital of France is", "Attention heads look back over"]
VICTIM = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2)
GRAMMARS = [None, None, GrammarSpec("json_object"), GrammarSpec("regex", "[a-c]{1,5}"),
            GrammarSpec("choice", '["yes", "no"]'), GrammarSpec("json_schema", '{"type": "integer", "minimum": 3}'),
            GrammarSpec("json_schema", '{"type": "object", "not": {}}')]


def edge_floats(*edges: float, lo: float, hi: float):
    """A float in [lo, hi], often one of the edges."""
    return st.one_of(st.sampled_from(edges), st.floats(lo, hi, allow_nan=False, allow_infinity=False))


@st.composite
def hostile_params(draw, vocab: int) -> dict:
    max_tokens = draw(st.integers(1, 12))
    return dict(
        max_tokens=max_tokens,
        temperature=draw(edge_floats(0.0, 1e-300, 1e-38, 1e-6, 1e-5, 1.0, 1e4, 1e30, 1e300, lo=0.0, hi=1e300)),
        top_p=draw(edge_floats(1e-300, 1e-9, 0.5, 1.0, lo=1e-300, hi=1.0)),
        top_k=draw(st.sampled_from([-1, 0, 1, 2, vocab - 1, vocab, vocab + 1, 2**62])),
        min_p=draw(edge_floats(0.0, 1e-300, 0.5, 1.0, lo=0.0, hi=1.0)),
        repetition_penalty=draw(edge_floats(1e-300, 1e-5, 1.0, 2.0, 1e300, lo=1e-300, hi=1e300)),
        presence_penalty=draw(edge_floats(-2.0, 0.0, 2.0, lo=-2.0, hi=2.0)),
        frequency_penalty=draw(edge_floats(-2.0, 0.0, 2.0, lo=-2.0, hi=2.0)),
        seed=draw(st.one_of(st.none(), st.integers(-2**70, 2**70))),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=8), max_size=4))),
        stop_token_ids=tuple(draw(st.lists(st.integers(0, 2 * vocab), max_size=4))),
        ignore_eos=draw(st.booleans()),
        min_tokens=draw(st.integers(0, max_tokens)),
        logprobs=draw(st.one_of(st.none(), st.integers(0, MAX_LOGPROBS))),
        include_stop_str_in_output=draw(st.booleans()),
        skip_special_tokens=draw(st.booleans()),
        head_telemetry=draw(st.booleans()),
        logit_bias=tuple(draw(st.dictionaries(st.integers(0, 2 * vocab), edge_floats(-100.0, 100.0, lo=-100.0, hi=100.0),
                                              max_size=4)).items()),
        grammar=draw(st.sampled_from(GRAMMARS)),
    )


@st.composite
def hostile_request(draw, vocab: int) -> tuple:
    prompt = draw(st.one_of(st.text(min_size=1, max_size=40),
                            st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40)))
    return prompt, draw(hostile_params(vocab))


def check_isolation(engine: Engine, expected: list[tuple], hostile: list[tuple]) -> None:
    victims = [engine.add_request(p, VICTIM) for p in VICTIM_PROMPTS]
    others = []
    for prompt, kwargs in hostile:
        try:
            others.append(engine.add_request(prompt, SamplingParams(**kwargs)))
        except InvalidRequestError:
            continue  # refused before scheduling: the clean way
    for rid, exp in zip(victims, expected):
        done = engine.collect(rid)
        assert done.finish_reason is FinishReason.LENGTH, done
        assert (done.token_ids, done.text) == exp
    for rid in others:
        done = engine.collect(rid)
        assert done.finish_reason in (FinishReason.STOP, FinishReason.LENGTH), done
        assert all(math.isfinite(lp.logprob) or lp.logprob == -math.inf for lp in done.logprobs or ())
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.scheduler.has_work()


def solo_outputs(engine: Engine) -> list[tuple]:
    return [(c.token_ids, c.text) for c in (engine.generate([p], VICTIM)[0] for p in VICTIM_PROMPTS)]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    engine = Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=96),
                                 scheduler=SchedulerConfig(max_model_len=96, max_num_batched_tokens=32)))
    return engine, solo_outputs(engine)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_no_request_changes_or_fails_another_tiny(tiny, data):
    engine, expected = tiny
    vocab = engine.model_config.vocab_size
    hostile = data.draw(st.lists(hostile_request(vocab), min_size=1, max_size=4))
    check_isolation(engine, expected, hostile)


@pytest.mark.slow
def test_no_request_changes_or_fails_another_default_model(default_model):
    engine = Engine(EngineConfig(cache=CacheConfig(memory_bytes=256 << 20),
                                 scheduler=SchedulerConfig(max_model_len=512)), loaded=default_model)
    expected = solo_outputs(engine)
    vocab = engine.model_config.vocab_size

    @settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(hostile=st.lists(hostile_request(vocab), min_size=1, max_size=3))
    def run(hostile):
        check_isolation(engine, expected, hostile)

    run()
