"""Continuous batching under a token budget (no torch).

vLLM v1's view: there are no phases, only requests whose num_computed_tokens advances toward
num_tokens (prompt + generated). Each step first gives running requests their next tokens (a
decode is 1 token, an unfinished prefill a chunk), in arrival order; when blocks run out the
most recently admitted running request is preempted (its blocks freed, recomputed later from
scratch, so it yields exactly the tokens it would have). Then waiting requests are admitted
first-come first-served, reusing cached prefix blocks, while the budget, the cap on running
sequences and the free blocks allow. Nothing is admitted in a step that preempted.

References: vLLM v1 scheduler.py, nano-vllm scheduler.py.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from server.config import SchedulerConfig
from server.engine.block_manager import BlockManager
from server.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int           # num_computed_tokens when scheduled
    num_new_tokens: int  # computes token_ids[start : start + num_new_tokens]
    samples: bool        # the chunk reaches the end of the sequence: its last row yields a token

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return cls(request, start, num_new_tokens, start + num_new_tokens == request.num_tokens)


@dataclass(frozen=True)
class Batch:
    """What one engine step computes."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[Request, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Remove a request wherever it is and return its blocks. Idempotent."""
        if request.status is RequestStatus.FINISHED:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.blocks.free(request.block_ids)
        request.num_committed_blocks = 0
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def schedule(self) -> Batch:
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            need = self.blocks.blocks_for(req.num_computed_tokens + n) - len(req.block_ids)
            while need > 0 and not self.blocks.can_allocate(need):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req preempted itself: nobody after it is left either
            if need > 0:
                self.blocks.allocate(req.block_ids, need)
            scheduled.append(ScheduledRequest.of(req, n))
            budget -= n
            i += 1

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.cfg.max_num_seqs):
            req = self.waiting[0]
            hit = self.blocks.find_prefix(req.token_ids)
            n = min(req.num_tokens - hit.num_tokens, budget)
            need = self.blocks.blocks_for(hit.num_tokens + n) - len(hit.block_ids)
            if not self.blocks.can_allocate(need, reuse=hit.block_ids):
                break
            self.waiting.popleft()
            self.blocks.allocate(req.block_ids, need, reuse=hit.block_ids)
            self.blocks.record_lookup(req.num_tokens, hit.num_tokens)
            req.num_computed_tokens = hit.num_tokens
            req.num_committed_blocks = len(hit.block_ids)
            if req.num_preemptions == 0:
                req.num_cached_tokens = hit.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(ScheduledRequest.of(req, n))
            budget -= n

        return Batch(tuple(scheduled), tuple(preempted))

    def _preempt(self, req: Request) -> None:
        self.blocks.free(req.block_ids)
        req.num_computed_tokens = 0
        req.num_committed_blocks = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
