"""Checked copies of read payloads: every byte copied, the first bad crc32 found, on one thread or several."""

import zlib

import numpy as np
import pytest

from ltri.offload.checked_copy import CheckedCopier, CopyJob, groups_by_bytes


def jobs_for(sizes, seed=0, bad=()):
    generator = np.random.default_rng(seed)
    payloads = [generator.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
    jobs = [
        CopyJob(memoryview(payload), zlib.crc32(payload) ^ (index in bad), np.zeros(len(payload), dtype=np.uint8))
        for index, payload in enumerate(payloads)
    ]
    return payloads, jobs


@pytest.mark.parametrize("workers,parallel_bytes", [(1, 0), (3, 0), (4, 1 << 40)])
def test_every_payload_is_copied(workers, parallel_bytes):
    payloads, jobs = jobs_for([7, 70_000, 1, 123_457, 9_999, 64_000, 5])
    copier = CheckedCopier(workers, parallel_bytes)
    try:
        assert copier.run(jobs) is None
    finally:
        copier.close()
    for payload, job in zip(payloads, jobs, strict=True):
        assert job.destination.tobytes() == payload


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("bad", [(0,), (5,), (2, 6)])
def test_the_first_bad_checksum_is_named(workers, bad):
    _, jobs = jobs_for([50_000] * 7, seed=1, bad=bad)
    copier = CheckedCopier(workers, parallel_bytes=0)
    try:
        assert copier.run(jobs) == min(bad)
    finally:
        copier.close()


@pytest.mark.parametrize("sizes,n_groups", [([5] * 10, 3), ([1, 1, 100, 1], 4), ([9], 4), ([3, 3], 8), ([], 2)])
def test_groups_cover_every_index_once_in_order(sizes, n_groups):
    groups = groups_by_bytes(sizes, n_groups)
    assert [index for group in groups for index in group] == list(range(len(sizes)))
    assert all(len(group) for group in groups) and len(groups) <= max(n_groups, 1)
