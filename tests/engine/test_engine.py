"""The engine end to end: batch invariance under staggered arrivals, chunked prefill and forced
preemption; seeded sampling; aborts; prefix caching; block accounting; bad input; streams."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.config import CacheConfig, EngineConfig, SchedulerConfig, TelemetryConfig
from server.engine.engine import Engine
from server.engine.errors import ContextLengthExceededError, InvalidRequestError
from server.engine.request import FinishReason, SamplingParams
from server.engine.telemetry_buffer import FLUSH_EVERY

PROMPTS = [
    "The capital of France is", "Attention heads", "Hello world! 1 2 3", "A quick brown fox",
    "some attend to the first token", "héllo wörld", "The capital of Italy is Rome.", "emojis and accents 😀",
    "1 2 3 4 5 6 7 8 9 10.", "jumps over the lazy dog", "look back over the context window",
    "The capital", "Hello", "Rome", "wörld ñ ç", "A",
]


def run_staggered(engine: Engine, prompts, params_list, arrivals_per_step: int = 3) -> dict[int, tuple]:
    """Add prompts a few at a time between steps (continuous batching), run to completion."""
    pending = list(enumerate(zip(prompts, params_list)))
    ids: dict[str, int] = {}
    results: dict[int, tuple] = {}
    tokens: dict[str, list[int]] = {}
    while pending or engine.has_unfinished():
        for _ in range(min(arrivals_per_step, len(pending))):
            i, (p, sp) = pending.pop(0)
            rid = engine.add_request(p, sp)
            ids[rid], tokens[rid] = i, []
        for ev in engine.step():
            tokens[ev.request_id].extend(ev.token_ids)
            if ev.finished:
                results[ids[ev.request_id]] = (tuple(tokens[ev.request_id]), ev.finish_reason)
    return results


def alone(engine: Engine, prompt, params) -> tuple:
    done = engine.generate([prompt], params)[0]
    return done.token_ids, done.finish_reason


def tiny_engine(path: str, **sched) -> Engine:
    return Engine(EngineConfig(model=path, cache=CacheConfig(num_blocks=sched.pop("num_blocks", 256)),
                               scheduler=SchedulerConfig(max_model_len=sched.pop("max_model_len", 256), **sched)))


def assert_blocks_all_free(engine: Engine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_batch_invariance_with_preemption_tiny(tiny_dir, sampling, request):
    if request.node.callspec.params["tiny_dir"] == "q4":
        # known and documented (README, "Models"): on the quantized path prefill rows run a dense
        # bfloat16 GEMM whose last bits move with the chunking, and bfloat16 roundings amplify
        # them; decodes stay invariant (tests/engine/test_default_model.py). Strict: a pass fails.
        request.applymarker(pytest.mark.xfail(strict=True, reason="quantized prefill depends on chunking"))
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True) if sampling == "greedy"
              else SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    solo = tiny_engine(tiny_dir)
    expected = [alone(solo, p, sp) for p, sp in zip(PROMPTS, params)]
    # 16 blocks of 16 tokens for 16 sequences of up to ~40 tokens: preemption is certain;
    # a 16-token budget forces chunked prefill mixed with decodes.
    crowded = tiny_engine(tiny_dir, num_blocks=16, max_num_batched_tokens=16, max_num_seqs=16)
    got = run_staggered(crowded, PROMPTS, params)
    assert crowded.scheduler.num_preemptions > 0
    for i, exp in enumerate(expected):
        assert got[i] == exp, f"prompt {i} differs"
    assert_blocks_all_free(crowded)


def test_seed_reproducible_and_different_seeds_differ(tiny_dir):
    engine = tiny_engine(tiny_dir)
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    a = engine.generate(["Hello"], p)[0].token_ids
    b = engine.generate(["Hello"], p)[0].token_ids
    c = engine.generate(["Hello"], SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True))[0].token_ids
    assert a == b and a != c


def test_abort_returns_blocks_and_spares_others(tiny_dir):
    engine = tiny_engine(tiny_dir)
    keep = engine.add_request("The capital of France is", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    drop = engine.add_request("Hello world", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _ in range(5):
        engine.step()
    engine.abort(drop)
    events = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.finished:
                events[ev.request_id] = ev
    assert events[drop].finish_reason is FinishReason.ABORT
    assert events[keep].finish_reason is FinishReason.LENGTH and events[keep].stats.num_output_tokens == 30
    assert_blocks_all_free(engine)
    ref = tiny_engine(tiny_dir).generate(["The capital of France is"],
                                               SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert events[keep].stats.num_output_tokens == len(ref.token_ids)


def test_abort_while_waiting_and_unknown_id(tiny_dir):
    engine = tiny_engine(tiny_dir)
    rid = engine.add_request("Hello", SamplingParams(max_tokens=5))
    engine.abort(rid)
    engine.abort("no-such-request")
    evs = engine.step()
    assert [e.finish_reason for e in evs] == [FinishReason.ABORT]
    assert_blocks_all_free(engine)


def test_prefix_cache_hit_gives_identical_output(tiny_dir):
    engine = tiny_engine(tiny_dir, num_blocks=128, max_model_len=512)
    tok = engine.tokenizer
    prefix = tok.encode("The capital of France is Paris. " * 40)[:300]
    assert len(prefix) == 300
    a_ids = prefix + tok.encode(" Rome")
    b_ids = prefix + tok.encode(" Hello world")
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    engine.generate([a_ids], p)
    hits_before = engine.block_manager.prefix_hits
    b_cached = engine.generate([b_ids], p)[0]
    assert engine.block_manager.prefix_hits - hits_before == 288  # 18 full blocks of 16
    assert b_cached.stats.num_cached_tokens == 288
    fresh = tiny_engine(tiny_dir, num_blocks=128, max_model_len=512)
    assert fresh.generate([b_ids], p)[0].token_ids == b_cached.token_ids
    assert_blocks_all_free(engine)


def test_stop_conditions(tiny_dir):
    engine = tiny_engine(tiny_dir)
    base = engine.generate(["Hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    stop_tok = base.token_ids[5]
    first = base.token_ids.index(stop_tok)
    r = engine.generate(["Hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                       stop_token_ids=(stop_tok,)))[0]
    assert r.finish_reason is FinishReason.STOP and r.stop_reason == stop_tok and len(r.token_ids) == first + 1
    r = engine.generate(["Hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                       stop_token_ids=(stop_tok,), min_tokens=12))[0]
    assert stop_tok not in r.token_ids and len(r.token_ids) == 12
    if base.text.strip():
        needle = base.text.strip()[:3]
        r = engine.generate(["Hello world"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           stop=(needle,)))[0]
        assert r.finish_reason is FinishReason.STOP and r.stop_reason == needle and needle not in r.text


def test_logprobs_returned(tiny_dir):
    engine = tiny_engine(tiny_dir)
    r = engine.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(r.logprobs) == 4
    for tok, lp in zip(r.token_ids, r.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok  # greedy picks the best


@pytest.mark.parametrize("prompt,params,exc", [
    ("x " * 300, SamplingParams(max_tokens=1), ContextLengthExceededError),
    ("Hello world", SamplingParams(max_tokens=255), ContextLengthExceededError),
    ("", SamplingParams(), InvalidRequestError),
    ([10**9], SamplingParams(), InvalidRequestError),
])
def test_bad_requests_rejected_before_scheduling(tiny_dir, prompt, params, exc):
    engine = tiny_engine(tiny_dir)
    with pytest.raises(exc):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(temperature=float("nan")),
                                    dict(temperature=float("inf")), dict(top_p=0), dict(top_p=1.5),
                                    dict(logprobs=21), dict(min_tokens=5, max_tokens=2), dict(stop=("",))])
def test_bad_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError):
        SamplingParams(**kwargs)


def test_background_loop_sync_and_async_streams(tiny_dir):
    engine = tiny_engine(tiny_dir)
    engine.start()
    try:
        p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        expected = tiny_engine(tiny_dir).generate(["Hello"], p)[0].token_ids

        def sync_read(out):
            out.extend(t for ev in engine.stream(engine.add_request("Hello", p)) for t in ev.token_ids)

        threads_out = [[] for _ in range(3)]
        threads = [threading.Thread(target=sync_read, args=(o,)) for o in threads_out]
        for t in threads:
            t.start()

        async def async_read():
            toks = []
            async for ev in engine.astream(engine.add_request("Hello", p)):
                toks.extend(ev.token_ids)
            return toks

        async def many():
            return await asyncio.gather(*(async_read() for _ in range(3)))

        async_out = asyncio.run(many())
        for t in threads:
            t.join(30)
        for toks in threads_out + list(async_out):
            assert tuple(toks) == expected
    finally:
        engine.shutdown()


def test_a_step_that_fails_is_pinned_on_its_request(tiny_dir, monkeypatch):
    """A step fails whenever one poisoned request is in it: that request alone ends (with an error
    of its own, not the exception's text); its neighbours finish with the output they have alone."""
    prompts = ["Hello world", "The capital of France", "Attention heads look back", "A quick brown fox"]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    solo = tiny_engine(tiny_dir)
    expected = [alone(solo, p, params) for p in prompts]
    engine = tiny_engine(tiny_dir)
    real = engine.runner.execute
    calls = {"n": 0}

    def poisoned(batch, stats, **kwargs):
        calls["n"] += 1
        if any(s.request.request_id == "poison" for s in batch.scheduled):
            raise RuntimeError("index 400 is out of bounds (internal detail)")
        return real(batch, stats, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    ids = [engine.add_request(p, params) for p in prompts[:2]]
    bad = engine.add_request("Hello", params, request_id="poison")
    ids += [engine.add_request(p, params) for p in prompts[2:]]
    done = {rid: engine.collect(rid) for rid in ids + [bad]}
    assert done[bad].finish_reason is FinishReason.ERROR
    for rid, exp in zip(ids, expected):
        assert (done[rid].token_ids, done[rid].finish_reason) == exp
    assert calls["n"] > 8  # the failing step was run again in parts
    assert_blocks_all_free(engine)


def test_a_failing_step_error_names_no_internals(tiny_dir, monkeypatch):
    engine = tiny_engine(tiny_dir)
    monkeypatch.setattr(engine.runner, "execute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("/secret/path")))
    rid = engine.add_request("Hello", SamplingParams(max_tokens=5, temperature=0))
    events = list(engine.stream(rid))
    assert events[-1].finish_reason is FinishReason.ERROR
    assert "/secret/path" not in events[-1].error and "RuntimeError" in events[-1].error
    assert_blocks_all_free(engine)


def test_request_telemetry_rows_and_sample_rate(tiny_dir):
    engine = tiny_engine(tiny_dir)
    r = engine.generate(["Hello world"], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True,
                                                       head_telemetry=True))[0]
    t = r.head_telemetry
    assert t.rows == 9 and t.layers == 3 and t.heads == 4 and t.kv_heads == 2
    assert len(t.entropy) == 3 and all(len(row) == 4 for row in t.entropy)
    snap = engine.head_stats_snapshot()
    assert int(snap.counts[0, 0]) == 9 and int(snap.histogram.sum()) == 9 * 3 * 4
    half = Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=64),
                               scheduler=SchedulerConfig(max_model_len=256),
                               telemetry=TelemetryConfig(sample_rate=0.5)))
    r = half.generate(["Hello world"], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                                                     head_telemetry=True))[0]
    assert r.head_telemetry.rows == 5
    off = Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=64),
                              scheduler=SchedulerConfig(max_model_len=256), telemetry=TelemetryConfig(enabled=False)))
    r = off.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0, head_telemetry=True))[0]
    assert r.head_telemetry.rows == 0


def test_running_sums_lag_a_few_steps_at_most_and_are_exact_when_idle(tiny_dir):
    """Statistics are finalized FLUSH_EVERY steps at a time (telemetry_buffer.py): while a request
    runs the running sums may miss its last few rows, never more; once it finishes they hold
    every row, and so does its own per-head telemetry."""
    engine = tiny_engine(tiny_dir)
    rid = engine.add_request("Hello world", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                           head_telemetry=True))
    tokens, lags = 0, []
    for ev in engine.stream(rid):
        tokens += len(ev.token_ids)
        lags.append(tokens - int(engine.head_stats_snapshot().counts[0, 0]))
    assert tokens == 40 and lags[-1] == 0 and ev.head_telemetry.rows == 40
    assert 0 < max(lags) <= FLUSH_EVERY - 1


def test_telemetry_never_changes_what_is_generated(tiny_dir):
    """Same tokens and the same logprobs, bit for bit, with telemetry on, off and sampled."""
    def run(**telemetry):
        engine = Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=128),
                                     scheduler=SchedulerConfig(max_model_len=256),
                                     telemetry=TelemetryConfig(**telemetry)))
        params = [SamplingParams(max_tokens=20, temperature=t, seed=i, logprobs=1, ignore_eos=True)
                  for i, t in enumerate((0.0, 0.8, 1.2, 0.0))]
        return [(c.token_ids, [lp.logprob for lp in c.logprobs]) for c in engine.generate(PROMPTS[:4], params)]

    on = run()
    assert run(enabled=False) == on
    assert run(sample_rate=0.5) == on


def test_stale_cache_contents_never_leak(tiny_dir):
    """Whatever freed blocks hold (here NaN everywhere), a new request reads only its own K/V."""
    engine = tiny_engine(tiny_dir)
    prompts = ["The capital of France is", "Hello", "A quick brown fox jumps"]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [c.token_ids for c in engine.generate(prompts, p)]
    for layer in range(engine.model_config.num_layers):
        engine.runner.cache.k[layer][:-1] = float("nan")  # every allocatable block; the zero pad block stays
        engine.runner.cache.v[layer][:-1] = float("nan")
    engine.block_manager = type(engine.block_manager)(engine.block_manager.num_blocks, 16, False)
    engine.scheduler.blocks = engine.block_manager
    assert [c.token_ids for c in engine.generate(prompts, p)] == expected


def test_one_request_can_fill_the_whole_context_window(tiny_dir):
    engine = Engine(EngineConfig(model=tiny_dir, cache=CacheConfig(num_blocks=128)))  # 2048 tokens
    assert engine.max_model_len == 2048
    prompt = [(7 * i) % 300 + 3 for i in range(2040)]
    done = engine.generate([prompt], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
    assert done.finish_reason is FinishReason.LENGTH and len(prompt) + len(done.token_ids) == 2048
    assert_blocks_all_free(engine)


def test_stop_string_before_min_tokens_is_ignored_not_an_error(tiny_dir):
    """A stop string that appears before min_tokens are out neither ends nor fails the request;
    one that appears after does end it."""
    engine = tiny_engine(tiny_dir)
    base = engine.generate(["Hello world"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    early = engine.tokenizer.decode(list(base.token_ids[:2]))
    assert early.strip(), "the tiny model's first tokens decode to text"
    needle = early.strip()[0]
    r = engine.generate(["Hello world"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                       stop=(needle,), min_tokens=16))[0]
    assert r.finish_reason is FinishReason.LENGTH
    assert r.token_ids == base.token_ids and r.text == base.text
    r = engine.generate(["Hello world"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                       stop=(needle,), min_tokens=1))[0]
    assert r.finish_reason is FinishReason.STOP and r.stop_reason == needle


@pytest.mark.parametrize("their_max_tokens", [40, 200])
def test_a_small_request_waits_one_step_behind_long_ones(tiny_dir, their_max_tokens):
    """Half the batch (the API's per-request cap) generating long outputs: a newcomer is admitted
    at the next step and finishes within its own few steps, whatever their max_tokens."""
    engine = tiny_engine(tiny_dir, max_num_seqs=16)
    long = SamplingParams(max_tokens=their_max_tokens, temperature=0, ignore_eos=True)
    for i in range(8):
        engine.add_request(PROMPTS[i], long)
    for _ in range(3):
        engine.step()                                   # prefilled, decoding
    rid = engine.add_request("Hello", SamplingParams(max_tokens=1, temperature=0))
    steps = 0
    while True:
        steps += 1
        if any(ev.request_id == rid and ev.finished for ev in engine.step()):
            break
    assert steps == 1
    while engine.has_unfinished():
        engine.step()


def test_stop_token_ids_outside_the_vocabulary_are_refused(tiny_dir):
    engine = tiny_engine(tiny_dir)
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match=rf"stop_token_ids: token ids must be in \[0, {vocab}\)"):
        engine.add_request("Hi", SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=(2147483647,)))
    assert not engine.has_unfinished()


def test_non_finite_logits_end_only_their_request(tiny_dir, monkeypatch):
    """The model gives NaN for one request's row: that request ends with its own error and a
    counted reason, its neighbour goes on with its solo output."""
    from server.engine import runner as runner_mod

    engine = tiny_engine(tiny_dir)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = alone(tiny_engine(tiny_dir), "Hello world", params)
    real_sample = runner_mod.sample

    def poisoning(logits, rows, allowed=None):
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.prompt_token_ids == poison_ids:
                logits[i] = float("nan")
        return real_sample(logits, rows, allowed)

    monkeypatch.setattr(runner_mod, "sample", poisoning)
    poison_ids = engine.tokenize("A quick brown fox")
    finished = []
    engine.add_observer(lambda step: finished.extend(step.finished))
    good = engine.add_request("Hello world", params)
    bad = engine.add_request(poison_ids, params)
    assert (engine.collect(good).token_ids, FinishReason.LENGTH) == expected
    last = list(engine.stream(bad))[-1]
    assert last.finish_reason is FinishReason.ERROR and "not finite" in last.error and not last.token_ids
    assert [f.error_reason for f in finished if f.request_id == bad] == ["nonfinite_logits"]
    assert_blocks_all_free(engine)
