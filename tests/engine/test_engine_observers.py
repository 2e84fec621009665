"""Step observers: what publishers (metrics, dashboard) receive from the engine each step."""

from __future__ import annotations

import pytest

from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.engine import Engine, StepStats
from server.engine.request import FinishReason, SamplingParams


def engine_with(path: str, **telemetry) -> Engine:
    return Engine(EngineConfig(model=path, cache=CacheConfig(num_blocks=64), scheduler=SchedulerConfig(max_model_len=128),
                               telemetry=TelemetryConfig(**telemetry)))


def observe(engine: Engine) -> list[StepStats]:
    seen: list[StepStats] = []
    engine.add_observer(seen.append)
    return seen


def test_latencies_and_finished_requests_match_the_streams(tiny_dir):
    engine = engine_with(tiny_dir, attention_time_sample_rate=1.0)
    steps = observe(engine)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 7)]
    done = engine.generate(["Hello world", "The capital of France is"], params)
    finished = {f.request_id: f for st in steps for f in st.finished}
    assert set(finished) == {d.request_id for d in done}
    for d in done:
        f = finished[d.request_id]
        assert f.finish_reason is FinishReason.LENGTH and f.stats == d.stats
        assert f.head_telemetry is not None and f.head_telemetry.rows == len(d.token_ids)
        assert d.head_telemetry is None   # not asked for: kept for publishers, not sent
    ttft = sorted(x for st in steps for x in st.time_to_first_token)
    assert ttft == pytest.approx(sorted(d.stats.time_to_first_token for d in done))
    itl = sorted(x for st in steps for x in st.inter_token_latencies)
    assert itl == pytest.approx(sorted(x for d in done for x in d.stats.inter_token_latencies))
    assert len(itl) == 2 + 6
    layers = engine.model_config.num_layers
    for st in steps:
        assert st.attention_times is not None and len(st.attention_times) == layers
        assert all(0.0 < t < st.step_time for t in st.attention_times)


def test_attention_timing_is_sampled_and_can_be_off(tiny_dir):
    engine = engine_with(tiny_dir, attention_time_sample_rate=0.25)
    steps = observe(engine)
    engine.generate(["Hello world"], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    timed = [st for st in steps if st.attention_times is not None]
    assert len(steps) == 16 and len(timed) == 4
    engine = engine_with(tiny_dir, attention_time_sample_rate=0.0)
    steps = observe(engine)
    engine.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0.0))
    assert steps and all(st.attention_times is None for st in steps)


def test_abort_of_a_waiting_request_is_observed(tiny_dir):
    engine = engine_with(tiny_dir)
    steps = observe(engine)
    rid = engine.add_request("Hello world", SamplingParams(max_tokens=4))
    engine.abort(rid)
    list(engine.stream(rid))
    (f,) = [f for st in steps for f in st.finished]
    assert f.finish_reason is FinishReason.ABORT and f.head_telemetry is None   # no row ran
    assert all(st.num_scheduled_tokens == 0 for st in steps)


def test_failing_observer_does_not_stop_serving(tiny_dir):
    engine = engine_with(tiny_dir)

    def broken(_step):
        raise RuntimeError("observer bug")

    engine.add_observer(broken)
    steps = observe(engine)
    done = engine.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[0]
    assert len(done.token_ids) == 3 and len(steps) == 3


def test_telemetry_off_keeps_no_request_heads(tiny_dir):
    engine = engine_with(tiny_dir, enabled=False)
    steps = observe(engine)
    engine.generate(["Hello"], SamplingParams(max_tokens=3, temperature=0.0))
    assert all(f.head_telemetry is None for st in steps for f in st.finished)


def test_internal_requests_are_left_out_of_every_statistic(tiny_dir):
    engine = engine_with(tiny_dir)
    steps = observe(engine)
    warm = engine.add_request("Hello", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), internal=True)
    user = engine.add_request("Hello world", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(engine.collect(warm).token_ids) == 3 and len(engine.collect(user).token_ids) == 4
    st = engine.stats()
    assert st.generation_tokens == 4 and st.prompt_tokens == len(engine.tokenize("Hello world"))
    hs = engine.head_stats_snapshot()
    assert hs.rows == 4 and bool((hs.counts == 4).all())
    assert [f.request_id for s in steps for f in s.finished] == [user]
    assert sum(len(s.time_to_first_token) for s in steps) == 1
    assert sum(len(s.inter_token_latencies) for s in steps) == 3
