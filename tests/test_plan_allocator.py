"""The CUDA caching allocator model (engine/plan/allocator.py) on small traces whose outcome
c10/cuda/CUDACachingAllocator.cpp's rules fix: rounding, segment sizes, best fit, splitting, merging,
and emptying the cache before running out of memory."""

import pytest

from engine.plan.allocator import CachingAllocatorModel, OutOfMemory, round_request, segment_size

KIB, MIB = 2**10, 2**20


def test_requests_round_up_to_512_bytes():
    assert [round_request(n) for n in (1, 511, 512, 513, 1000)] == [512, 512, 512, 1024, 1024]


@pytest.mark.parametrize("request_bytes, segment", [(512, 2 * MIB), (MIB, 2 * MIB), (MIB + 512, 20 * MIB),
                                                    (10 * MIB - 512, 20 * MIB), (10 * MIB, 10 * MIB),
                                                    (11 * MIB + 512, 12 * MIB)])
def test_segment_sizes_follow_the_pool_rules(request_bytes, segment):
    assert segment_size(request_bytes) == segment


def test_small_requests_share_one_2_mib_segment():
    allocator = CachingAllocatorModel()
    blocks = [allocator.malloc(100 * KIB) for _ in range(20)]  # 20 x 100 KiB fit in 2 MiB
    assert allocator.reserved == 2 * MIB and allocator.segments == 1
    assert allocator.allocated == 20 * 100 * KIB
    allocator.malloc(100 * KIB)
    assert allocator.reserved == 4 * MIB  # the 21st needs a second segment
    for block in blocks:
        allocator.free(block)
    assert allocator.reserved == 4 * MIB  # cached, never returned


def test_large_requests_under_10_mib_are_carved_from_20_mib_segments():
    allocator = CachingAllocatorModel()
    blocks = [allocator.malloc(5 * MIB) for _ in range(4)]
    assert allocator.reserved == 20 * MIB and allocator.segments == 1
    allocator.malloc(5 * MIB)
    assert allocator.reserved == 40 * MIB
    allocator.free(blocks[1])
    allocator.malloc(4 * MIB)  # best fit: the freed 5 MiB block, no new segment
    assert allocator.reserved == 40 * MIB


def test_a_large_block_is_split_only_when_more_than_1_mib_remains():
    allocator = CachingAllocatorModel()
    block = allocator.malloc(11 * MIB + 512)  # a 12 MiB segment; 1 MiB - 512 B would remain: no split
    assert allocator.reserved == 12 * MIB
    assert block.size == 12 * MIB and allocator.allocated == 12 * MIB  # statistics count the whole block


def test_freed_neighbours_merge_so_a_larger_request_fits_again():
    allocator = CachingAllocatorModel()
    first, second = allocator.malloc(6 * MIB), allocator.malloc(6 * MIB)
    rest = allocator.malloc(6 * MIB)  # the 20 MiB segment: 6 + 6 + 6, 2 MiB left
    allocator.free(first)
    allocator.free(second)
    allocator.malloc(12 * MIB)  # only if the two freed blocks merged
    assert allocator.reserved == 20 * MIB
    allocator.free(rest)
    assert allocator.allocated == 12 * MIB


def test_best_fit_prefers_the_smallest_block_that_fits():
    allocator = CachingAllocatorModel()
    big = allocator.malloc(16 * MIB)  # 16 MiB segment
    small = allocator.malloc(12 * MIB)  # 12 MiB segment
    allocator.free(big)
    allocator.free(small)
    block = allocator.malloc(11 * MIB)
    assert block.size == 12 * MIB  # from the 12 MiB block, not a split of the 16 MiB one


def test_peaks_track_the_largest_totals():
    allocator = CachingAllocatorModel()
    blocks = [allocator.malloc(30 * MIB) for _ in range(3)]
    for block in blocks:
        allocator.free(block)
    allocator.malloc(30 * MIB)
    assert allocator.peak_allocated == 90 * MIB and allocator.allocated == 30 * MIB
    assert allocator.peak_reserved == allocator.reserved == 90 * MIB
    block = allocator.malloc(MIB)
    allocator.free(block)
    with pytest.raises(ValueError, match="freed twice"):
        allocator.free(block)


def test_a_segment_that_fits_only_after_emptying_the_cache_is_made():
    allocator = CachingAllocatorModel(capacity=40 * MIB)
    allocator.free(allocator.malloc(30 * MIB))  # 30 MiB reserved, all of it cached
    allocator.malloc(32 * MIB)  # 30 + 32 > 40: the free 30 MiB segment goes back first
    assert allocator.reserved == 32 * MIB and allocator.releases == 1


def test_running_out_under_a_capacity_raises():
    allocator = CachingAllocatorModel(capacity=40 * MIB)
    allocator.malloc(30 * MIB)
    with pytest.raises(OutOfMemory):
        allocator.malloc(12 * MIB)  # 30 MiB live, nothing cached to release
