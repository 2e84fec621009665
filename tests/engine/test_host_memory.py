"""Huge-page CPU tensors (server/engine/host_memory.py): the copies are exact, aligned and alive
as long as a view of them is, small tensors share an arena's chunks, and the kernel is asked for
huge pages where it offers them."""

from __future__ import annotations

import gc
import mmap

import pytest
import torch

from server.engine.host_memory import ALIGN, HUGE_PAGE, Arena, huge_empty, on_huge_pages


def test_huge_empty_is_aligned_writable_and_outlives_its_mapping_name():
    t = huge_empty((3, 1000, 700), torch.bfloat16)                             # [3, 1000, 700]
    assert t.shape == (3, 1000, 700) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(2.5)
    row = t[2]
    del t
    gc.collect()
    assert row.float().sum().item() == 2.5 * 700_000                          # the mapping lives on
    assert huge_empty((0, 4), torch.float32).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.float16, torch.float32, torch.bfloat16])
def test_on_huge_pages_and_the_arena_copy_exactly(dtype):
    src = (torch.randn(37, 19, 5) * 50).to(dtype)                             # [37, 19, 5]
    for copy in (on_huge_pages, Arena().copy):
        out = copy(src)
        assert out.dtype == dtype and out.shape == src.shape and out.is_contiguous() and torch.equal(out, src)
        assert out.data_ptr() != src.data_ptr()
    noncontig = src.transpose(0, 2)                                            # [5, 19, 37] strided
    assert torch.equal(Arena().copy(noncontig), noncontig)


def test_the_arena_packs_small_tensors_into_shared_chunks():
    arena = Arena(chunk_bytes=256 << 10)
    parts = [torch.full((n,), float(n)) for n in (1, 7, 1000, 30_000, 40_000, 5)]  # float32, 4 bytes .. 160 KB
    copies = [arena.copy(p) for p in parts]
    assert all(torch.equal(c, p) for c, p in zip(copies, parts))
    assert all(c.data_ptr() % ALIGN == 0 for c in copies)
    # the first four fit in one chunk, one after another; the 160 KB one opens a second, where
    # the last follows it
    starts = [c.data_ptr() for c in copies]
    assert starts[1] - starts[0] == ALIGN and 0 < starts[3] - starts[2] < 4000 + ALIGN
    assert not (starts[0] <= starts[4] < starts[0] + (256 << 10))
    assert starts[5] - starts[4] == 160_000
    big = torch.arange(300_000, dtype=torch.float32)                          # 1.2 MB: its own mapping
    assert torch.equal(arena.copy(big), big)
    del arena
    gc.collect()
    assert all(torch.equal(c, p) for c, p in zip(copies, parts))             # views keep their chunk


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")
def test_the_kernel_backs_a_touched_arena_with_huge_pages_where_thp_is_on():
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are off here")

    def anon_huge_kb() -> int:
        rollup = open("/proc/self/smaps_rollup").read()
        return int(rollup.split("AnonHugePages:")[1].split()[0])

    before = anon_huge_kb()
    t = huge_empty((16 << 20,), torch.uint8)                                   # 16 MiB
    t.fill_(1)
    assert anon_huge_kb() - before >= 8 << 10                                  # at least half on 2 MiB pages
