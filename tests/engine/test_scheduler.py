"""Scheduler: continuous batching under a token budget, chunked prefill, prefix reuse, preemption.

`Sim` plays the engine: after each schedule() it advances every scheduled request by its chunk,
commits its full blocks, appends a generated token when the chunk samples, and finishes a
request once it has produced max_tokens. Generated tokens are a pure function of the sequence so
far (like greedy decoding), so identical sequences keep sharing prefixes. Around every step Sim
checks the contracts the runner relies on: the budget and the sequence cap, block tables that
cover each chunk, ref counts that equal the number of tables holding a block, chunks that follow
each other (or restart at 0 / a prefix hit after preemption), and prefix hits whose blocks hold
exactly the request's tokens. Hypothesis then drives it with random arrivals, steps and aborts.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from server.config import SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from server.engine.scheduler import Batch, Scheduler, ScheduledRequest


def make_request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(prompt), params=SamplingParams(max_tokens=max_tokens),
                   arrival_time=0.0, max_tokens=max_tokens)


def next_token(req: Request) -> int:
    """A deterministic 'model': the next token depends only on the sequence so far."""
    return (sum(req.token_ids[-3:]) * 7 + len(req.token_ids)) % 5


class Sim:
    """The engine's update step around a real Scheduler and BlockManager, checking every step."""

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, budget: int,
                 enable_prefix_caching: bool = True) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        self.sched = Scheduler(self.cfg, self.bm)
        self.bs = block_size
        self.requests: dict[str, Request] = {}
        self.content: dict[int, tuple[int, ...]] = {}  # block -> token prefix whose K/V it holds (full blocks)
        self.expected_start: dict[str, int] = {}       # rid -> next chunk start; absent until (re)admitted
        self.table_len: dict[str, int] = {}
        self.steps = 0
        self.batches: list[Batch] = []
        self.admissions: list[tuple[str, int]] = []   # (rid, start) at each (re)admission
        self.finished_at: dict[str, int] = {}
        self.arrival: dict[str, int] = {}              # rid -> arrival order

    # -- the engine's side
    def add(self, req: Request) -> Request:
        self.requests[req.request_id] = req
        self.arrival[req.request_id] = len(self.arrival)
        self.sched.add(req)
        return req

    def abort(self, req: Request) -> None:
        self.sched.finish(req, FinishReason.ABORT)
        self.expected_start.pop(req.request_id, None)
        self.finished_at.setdefault(req.request_id, self.steps)
        self.check_blocks()

    def step(self) -> Batch:
        waiting_before = [r.request_id for r in self.sched.waiting]
        batch = self.sched.schedule()
        self.steps += 1
        self.batches.append(batch)
        self.check_batch(batch, waiting_before)
        self.check_blocks()
        self.apply(batch)
        self.check_blocks()
        return batch

    def run(self, max_steps: int) -> None:
        start = self.steps
        while self.sched.has_work():
            assert self.steps - start < max_steps, "requests starved: the run did not finish in the bound"
            self.step()

    def apply(self, batch: Batch) -> None:
        for s in batch.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            req.num_committed_blocks = self.bm.commit(req.block_ids, req.token_ids, req.num_computed_tokens,
                                                      req.num_committed_blocks)
            full = req.num_computed_tokens // self.bs
            assert req.num_committed_blocks == (full if self.bm.enable_prefix_caching else 0)
            for j in range(s.start // self.bs, full):
                self.content[req.block_ids[j]] = tuple(req.token_ids[:(j + 1) * self.bs])
            self.expected_start[req.request_id] = req.num_computed_tokens
            self.table_len[req.request_id] = len(req.block_ids)
            if s.samples:
                req.token_ids.append(next_token(req))
                if req.num_output_tokens == req.max_tokens:
                    self.sched.finish(req, FinishReason.LENGTH)
                    self.expected_start.pop(req.request_id)
                    self.finished_at[req.request_id] = self.steps

    # -- the checks
    def check_batch(self, batch: Batch, waiting_before: list[str]) -> None:
        bs = self.bs
        assert batch.num_tokens == sum(s.num_new_tokens for s in batch.scheduled)
        assert batch.num_tokens <= self.cfg.max_num_batched_tokens
        assert self.sched.num_running <= self.cfg.max_num_seqs
        assert batch.empty == (not batch.scheduled)
        ids = [s.request.request_id for s in batch.scheduled]
        assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
        running_ids = [r.request_id for r in self.sched.running]
        assert set(ids) <= set(running_ids)
        for p in batch.preempted:
            assert p.request_id not in ids
            assert p.status is RequestStatus.PREEMPTED
            assert p.block_ids == [] and p.num_computed_tokens == 0 and p.num_committed_blocks == 0
            assert any(w is p for w in self.sched.waiting)
            assert p.request_id not in waiting_before, "a waiting request cannot be preempted"
            self.expected_start.pop(p.request_id)
        fresh: list[int] = []
        for s in batch.scheduled:
            req = s.request
            rid = req.request_id
            assert req.status is RequestStatus.RUNNING
            assert s.num_new_tokens >= 1
            assert s.start == req.num_computed_tokens
            assert s.start + s.num_new_tokens <= req.num_tokens
            assert s.samples == (s.start + s.num_new_tokens == req.num_tokens)
            assert len(req.block_ids) == self.bm.blocks_for(s.start + s.num_new_tokens), \
                "the table must cover exactly the tokens computed so far and this chunk"
            if rid in self.expected_start:   # a running request continues where it stopped
                assert rid not in waiting_before
                assert s.start == self.expected_start[rid], "chunks must be contiguous"
                fresh += req.block_ids[self.table_len[rid]:]
            else:                            # (re)admitted: starts at 0 or at a prefix hit
                assert rid in waiting_before
                assert not batch.preempted, "nothing is admitted in a step that preempted"
                self.admissions.append((rid, s.start))
                assert s.start % bs == 0 and s.start <= (req.num_tokens - 1) // bs * bs
                if not self.bm.enable_prefix_caching:
                    assert s.start == 0
                assert req.num_committed_blocks == s.start // bs
                for j in range(s.start // bs):
                    assert self.content.get(req.block_ids[j]) == tuple(req.token_ids[:(j + 1) * bs]), \
                        "a prefix hit must hold exactly the request's tokens"
                fresh += req.block_ids[s.start // bs:]
        for b in fresh:                      # handed out fresh: its old K/V is about to be overwritten
            self.content.pop(b, None)

    def check_blocks(self) -> None:
        # FCFS: the queue and the running list stay in arrival order, every running request
        # arrived before every waiting one (a preempted request goes back to the queue's front)
        running = [self.arrival[r.request_id] for r in self.sched.running]
        waiting = [self.arrival[r.request_id] for r in self.sched.waiting]
        assert running == sorted(running) and waiting == sorted(waiting)
        assert not running or not waiting or max(running) < min(waiting)
        bm = self.bm
        tables = {r.request_id: r.block_ids for r in self.sched.running}
        for r in self.sched.waiting:
            assert r.block_ids == [] and r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.request_id not in tables
        for r in self.requests.values():
            if r.is_finished:
                assert r.block_ids == [] and r.request_id not in tables
        owners = Counter(b for t in tables.values() for b in t)
        for t in tables.values():
            assert len(set(t)) == len(t)
        live = [b for b in range(bm.num_blocks) if bm.ref_count(b) > 0]
        assert bm.num_free_blocks + len(live) == bm.num_blocks
        for b in range(bm.num_blocks):
            assert bm.ref_count(b) == owners.get(b, 0), f"block {b}: ref count vs tables"
        for b, n in owners.items():          # sharing is only ever of equal, computed prefixes
            if n > 1:
                for rid, t in tables.items():
                    if b in t:
                        j = t.index(b)
                        req = self.requests[rid]
                        assert self.content.get(b) == tuple(req.token_ids[:(j + 1) * self.bs])
                        assert req.num_computed_tokens >= (j + 1) * self.bs

    def scheduled_of(self, batch: Batch, req: Request) -> ScheduledRequest | None:
        return next((s for s in batch.scheduled if s.request is req), None)

    def assert_all_done(self) -> None:
        assert not self.sched.has_work() and self.sched.num_running == 0 and self.sched.num_waiting == 0
        assert self.bm.num_free_blocks == self.bm.num_blocks
        for r in self.requests.values():
            assert r.is_finished and r.block_ids == []
            if r.finish_reason is FinishReason.LENGTH:
                assert r.num_output_tokens == r.max_tokens
            else:
                assert r.finish_reason is FinishReason.ABORT and r.num_output_tokens < r.max_tokens


# -- basics ---------------------------------------------------------------------------------------
def test_single_request_prefill_then_decode():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=64)
    req = sim.add(make_request("a", list(range(10)), 3))
    assert req.status is RequestStatus.WAITING and sim.sched.num_waiting == 1
    b1 = sim.step()
    assert [(s.start, s.num_new_tokens, s.samples) for s in b1.scheduled] == [(0, 10, True)]
    b2 = sim.step()
    assert [(s.start, s.num_new_tokens, s.samples) for s in b2.scheduled] == [(10, 1, True)]
    b3 = sim.step()
    assert [(s.start, s.num_new_tokens, s.samples) for s in b3.scheduled] == [(11, 1, True)]
    assert req.is_finished and req.finish_reason is FinishReason.LENGTH and req.num_output_tokens == 3
    assert sim.sched.schedule().empty
    sim.assert_all_done()


def test_empty_scheduler_schedules_nothing():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=2, budget=8)
    assert not sim.sched.has_work()
    batch = sim.sched.schedule()
    assert batch.empty and batch.num_tokens == 0 and batch.preempted == ()


def test_max_num_seqs_caps_running_requests():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, budget=256)
    reqs = [sim.add(make_request(f"r{i}", [i] * 5, 4)) for i in range(5)]
    batch = sim.step()
    assert [s.request for s in batch.scheduled] == reqs[:2]
    assert sim.sched.num_running == 2 and sim.sched.num_waiting == 3
    sim.run(max_steps=100)
    sim.assert_all_done()


def test_budget_is_shared_fcfs_and_admission_stops_at_the_first_misfit():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=8, budget=16)
    a = sim.add(make_request("a", [1] * 10, 2))
    b = sim.add(make_request("b", [2] * 10, 2))
    batch = sim.step()
    # a takes 10 tokens, b gets the 6 that are left, as a first chunk of its prefill
    assert [(s.request, s.start, s.num_new_tokens, s.samples) for s in batch.scheduled] == \
        [(a, 0, 10, True), (b, 0, 6, False)]
    batch = sim.step()
    assert [(s.request, s.start, s.num_new_tokens) for s in batch.scheduled] == [(a, 10, 1), (b, 6, 4)]
    sim.run(max_steps=10)
    sim.assert_all_done()


def test_finish_is_idempotent_and_removes_from_anywhere():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=1, budget=16)
    running = sim.add(make_request("run", [1] * 6, 5))
    waiting = sim.add(make_request("wait", [2] * 6, 5))
    sim.step()
    assert running.status is RequestStatus.RUNNING and waiting.status is RequestStatus.WAITING
    sim.abort(waiting)
    assert waiting.is_finished and waiting.finish_reason is FinishReason.ABORT
    assert sim.sched.num_waiting == 0
    sim.abort(running)
    assert sim.sched.num_running == 0 and sim.bm.num_free_blocks == 16
    sim.sched.finish(running, FinishReason.LENGTH)   # second finish changes nothing
    assert running.finish_reason is FinishReason.ABORT and sim.bm.num_free_blocks == 16
    assert sim.sched.schedule().empty
    sim.assert_all_done()


# -- chunked prefill ------------------------------------------------------------------------------
def test_long_prompt_is_prefilled_in_budget_chunks_alongside_decodes():
    sim = Sim(num_blocks=128, block_size=16, max_num_seqs=8, budget=64)
    b = sim.add(make_request("b", [1] * 10, 40))
    c = sim.add(make_request("c", [2] * 12, 40))
    sim.step()
    a = sim.add(make_request("a", [3, 4] * 500, 3))
    a_chunks = []
    while not a.is_finished:
        batch = sim.step()
        s_a = sim.scheduled_of(batch, a)
        assert s_a is not None, "the long prompt advances every step"
        a_chunks.append((s_a.start, s_a.num_new_tokens, s_a.samples))
        if s_a.start < 1000:                        # still prefilling: b and c keep decoding
            for other in (b, c):
                s_o = sim.scheduled_of(batch, other)
                assert s_o is not None and s_o.num_new_tokens == 1 and s_o.samples
            if not s_a.samples:
                assert batch.num_tokens == 64       # the prefill fills what the decodes leave
    prefill = [ch for ch in a_chunks if ch[0] < 1000]
    assert all(n <= 64 for _, n, _ in prefill)
    assert [n for _, n, _ in prefill[:-1]] == [62] * (len(prefill) - 1)
    assert sum(n for _, n, _ in prefill) == 1000
    assert [smp for _, _, smp in prefill] == [False] * (len(prefill) - 1) + [True]
    assert a.num_output_tokens == 3
    sim.run(max_steps=100)
    sim.assert_all_done()


def test_long_prompt_alone_uses_the_whole_budget():
    sim = Sim(num_blocks=128, block_size=16, max_num_seqs=8, budget=64)
    a = sim.add(make_request("a", list(range(1000)), 1))
    sizes = []
    while sim.sched.has_work():
        batch = sim.step()
        sizes += [(s.num_new_tokens, s.samples) for s in batch.scheduled]
    assert sizes == [(64, False)] * 15 + [(40, True)]
    assert a.num_output_tokens == 1
    sim.assert_all_done()


# -- prefix caching -------------------------------------------------------------------------------
def _run_a_then_b(enable_prefix_caching: bool):
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=4, budget=512,
              enable_prefix_caching=enable_prefix_caching)
    prompt_a = [(i * 7) % 11 for i in range(300)]
    a = sim.add(make_request("a", prompt_a, 4))
    sim.step()
    a_blocks = list(a.block_ids)
    sim.run(max_steps=10)
    assert a.is_finished and a.num_output_tokens == 4
    queries, hits = sim.bm.prefix_queries, sim.bm.prefix_hits
    b = sim.add(make_request("b", prompt_a + [20, 21, 22, 23, 24], 2))
    batch = sim.step()
    return sim, a_blocks, b, batch, queries, hits


def test_prefix_cache_reuses_a_finished_requests_blocks():
    sim, a_blocks, b, batch, queries, hits = _run_a_then_b(True)
    (s,) = batch.scheduled
    assert s.request is b and s.start == 288 and s.num_new_tokens == 305 - 288
    assert b.num_cached_tokens == 288
    assert b.block_ids[:18] == a_blocks[:18]
    assert b.block_ids[18] not in a_blocks[:18]
    assert sim.bm.prefix_hits - hits == 288
    assert sim.bm.prefix_queries - queries == 305
    sim.run(max_steps=10)
    sim.assert_all_done()


def test_prefix_cache_disabled_reuses_nothing():
    sim, a_blocks, b, batch, queries, hits = _run_a_then_b(False)
    (s,) = batch.scheduled
    assert s.start == 0 and s.num_new_tokens == 305
    assert b.num_cached_tokens == 0
    assert sim.bm.prefix_hits == 0
    sim.run(max_steps=10)
    sim.assert_all_done()


def test_running_requests_share_prefix_blocks():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=4, budget=512)
    prompt = list(range(100))
    a = sim.add(make_request("a", prompt, 8))
    sim.step()
    b = sim.add(make_request("b", prompt[:96] + [7, 7, 7], 8))
    batch = sim.step()
    s_b = sim.scheduled_of(batch, b)
    assert s_b.start == 96 and b.block_ids[:6] == a.block_ids[:6]
    assert all(sim.bm.ref_count(x) == 2 for x in a.block_ids[:6])
    sim.abort(a)
    assert all(sim.bm.ref_count(x) == 1 for x in b.block_ids[:6])
    sim.run(max_steps=20)
    sim.assert_all_done()


def test_identical_prompt_is_recomputed_only_past_the_last_full_block():
    sim = Sim(num_blocks=64, block_size=16, max_num_seqs=4, budget=512)
    prompt = list(range(64))                  # exactly 4 blocks
    sim.add(make_request("a", prompt, 1))
    sim.run(max_steps=5)
    b = sim.add(make_request("b", prompt, 1))
    (s,) = sim.step().scheduled
    assert s.request is b and s.start == 48 and s.num_new_tokens == 16 and s.samples
    sim.assert_all_done()


# -- preemption -----------------------------------------------------------------------------------
def test_tiny_cache_preempts_and_every_request_still_gets_all_its_tokens():
    sim = Sim(num_blocks=7, block_size=4, max_num_seqs=4, budget=32)
    reqs = [sim.add(make_request(f"r{i}", [i % 5] * 7 + [i], 14)) for i in range(6)]
    sim.run(max_steps=sum(r.num_prompt_tokens + r.max_tokens for r in reqs))
    assert sim.sched.num_preemptions > 0
    assert any(b.preempted for b in sim.batches)
    assert sum(r.num_preemptions for r in reqs) == sim.sched.num_preemptions
    sim.assert_all_done()
    # the same requests with room for all: identical outputs (preemption recomputes, never resamples)
    roomy = Sim(num_blocks=64, block_size=4, max_num_seqs=4, budget=32)
    twins = [roomy.add(make_request(r.request_id, r.prompt_token_ids, r.max_tokens)) for r in reqs]
    roomy.run(max_steps=100)
    assert roomy.sched.num_preemptions == 0
    assert [r.output_token_ids for r in reqs] == [t.output_token_ids for t in twins]


def test_preemption_takes_the_most_recently_admitted_and_readmits_it_first():
    sim = Sim(num_blocks=6, block_size=4, max_num_seqs=2, budget=32, enable_prefix_caching=False)
    a = sim.add(make_request("a", [1] * 8, 8))   # each needs 4 blocks by its end: 8 > 6
    b = sim.add(make_request("b", [2] * 8, 8))
    c = sim.add(make_request("c", [3] * 4, 2))   # arrives last; waits for a free sequence slot
    batch = sim.step()
    assert [s.request for s in batch.scheduled] == [a, b]
    preempted_order = []
    while sim.sched.has_work():
        batch = sim.step()
        preempted_order += [p.request_id for p in batch.preempted]
    assert preempted_order and preempted_order[0] == "b"
    assert a.num_preemptions == 0                          # the oldest request is never the victim
    assert [rid for rid, _ in sim.admissions] == ["a", "b", "b", "c"]   # b goes back to the front
    sim.assert_all_done()


def test_preempted_request_restarts_from_its_own_cached_prefix():
    sim = Sim(num_blocks=8, block_size=4, max_num_seqs=2, budget=64)
    a = sim.add(make_request("a", [1] * 12, 9))    # grows to 5 blocks
    b = sim.add(make_request("b", [2] * 12, 9))
    sim.step()
    while b.num_preemptions == 0:
        sim.step()
    sim.run(max_steps=100)
    restarts = [start for rid, start in sim.admissions if rid == "b"][1:]
    assert restarts and restarts[0] > 0, "b should find its own blocks still cached"
    assert b.num_cached_tokens == 0                # counted at first admission only
    assert a.num_preemptions == 0
    sim.assert_all_done()


def test_aborting_a_preempted_request_removes_it_from_the_queue():
    sim = Sim(num_blocks=6, block_size=4, max_num_seqs=4, budget=32)
    a = sim.add(make_request("a", [1] * 8, 12))
    b = sim.add(make_request("b", [2] * 8, 12))
    sim.step()
    while b.status is not RequestStatus.PREEMPTED:
        sim.step()
    sim.abort(b)
    assert b.is_finished and all(w is not b for w in sim.sched.waiting)
    aborted_at = len(sim.batches)
    sim.run(max_steps=50)
    assert a.num_output_tokens == 12
    assert all(sim.scheduled_of(batch, b) is None for batch in sim.batches[aborted_at:])
    sim.assert_all_done()


# -- properties -----------------------------------------------------------------------------------
PREFIXES = st.sampled_from([[], [0, 1, 2, 3], [4, 4, 4, 4, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
SUFFIX = st.lists(st.integers(0, 4), max_size=12)
MAX_PROMPT, MAX_OUTPUT = 24, 10


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 8))
    reqs = []
    for i in range(n):
        prompt = (draw(PREFIXES) + draw(SUFFIX))[:MAX_PROMPT] or [i % 5]
        reqs.append((prompt, draw(st.integers(1, MAX_OUTPUT))))
    return reqs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=workloads(), block_size=st.sampled_from([1, 2, 4, 8]), max_num_seqs=st.integers(1, 5),
       extra_budget=st.integers(0, 30), spare_blocks=st.integers(0, 8), caching=st.booleans())
def test_fcfs_every_request_finishes_within_its_bound(reqs, block_size, max_num_seqs, extra_budget,
                                                       spare_blocks, caching):
    """All arrive at once. The oldest unfinished request advances every step and is never
    preempted, so request i finishes by step sum_{j <= i}(prompt_j + max_tokens_j)."""
    min_blocks = -(-(MAX_PROMPT + MAX_OUTPUT - 1) // block_size)
    sim = Sim(num_blocks=min_blocks + spare_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
              budget=max_num_seqs + extra_budget, enable_prefix_caching=caching)
    added = [sim.add(make_request(f"r{i}", p, k)) for i, (p, k) in enumerate(reqs)]
    sim.run(max_steps=sum(len(p) + k for p, k in reqs))
    sim.assert_all_done()
    bound = 0
    for r in added:
        bound += r.num_prompt_tokens + r.max_tokens
        assert sim.finished_at[r.request_id] <= bound


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps and aborts (waiting, running or preempted) against Sim's checks."""

    @initialize(block_size=st.sampled_from([1, 2, 4, 8]), max_num_seqs=st.integers(1, 4),
                extra_budget=st.integers(0, 20), spare_blocks=st.integers(0, 3),
                caching=st.sampled_from([True, True, True, False]))
    def setup(self, block_size, max_num_seqs, extra_budget, spare_blocks, caching):
        min_blocks = -(-(MAX_PROMPT + MAX_OUTPUT - 1) // block_size)   # the largest request fits alone
        self.sim = Sim(num_blocks=min_blocks + spare_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                       budget=max_num_seqs + extra_budget, enable_prefix_caching=caching)
        self.n = 0

    @rule(prefix=PREFIXES, suffix=SUFFIX, max_tokens=st.integers(1, MAX_OUTPUT))
    def add(self, prefix, suffix, max_tokens):
        prompt = (prefix + suffix)[:MAX_PROMPT] or [self.n % 5]
        self.sim.add(make_request(f"r{self.n}", prompt, max_tokens))
        self.n += 1

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            self.sim.step()

    @precondition(lambda self: self.sim.sched.has_work())
    @rule(data=st.data(), now=st.booleans())
    def abort(self, data, now):
        if not now:                          # abort every other time: let some requests run to the end
            return
        live = list(self.sim.sched.running) + list(self.sim.sched.waiting)
        req = data.draw(st.sampled_from(live), label="abort")
        self.sim.abort(req)
        assert req.is_finished and req.finish_reason is FinishReason.ABORT
        assert all(r is not req for r in list(self.sim.sched.running) + list(self.sim.sched.waiting))

    @precondition(lambda self: any(r.status is RequestStatus.PREEMPTED for r in self.sim.sched.waiting))
    @rule(data=st.data())
    def abort_preempted(self, data):
        preempted = [r for r in self.sim.sched.waiting if r.status is RequestStatus.PREEMPTED]
        req = data.draw(st.sampled_from(preempted), label="abort preempted")
        self.sim.abort(req)
        assert req.is_finished and all(r is not req for r in self.sim.sched.waiting)

    @precondition(lambda self: any(r.is_finished for r in self.sim.requests.values()))
    @rule(data=st.data())
    def finish_again(self, data):
        done = [r for r in self.sim.requests.values() if r.is_finished]
        req = data.draw(st.sampled_from(done), label="finish again")
        reason = req.finish_reason
        self.sim.sched.finish(req, FinishReason.ERROR)
        assert req.finish_reason is reason

    @invariant()
    def blocks_add_up(self):
        self.sim.check_blocks()

    def teardown(self):
        sim = self.sim
        pending = [r for r in sim.requests.values() if not r.is_finished]
        sim.run(max_steps=sum(r.num_prompt_tokens + r.max_tokens for r in pending) + 1)
        sim.assert_all_done()


SchedulerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestSchedulerMachine = SchedulerMachine.TestCase
