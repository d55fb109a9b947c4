"""HostStaging: a step's inputs reach the device through a ring of pinned regions.

On CUDA the copies must be queued without waiting for the GPU (the reason it exists: pageable copies held
the host until the stream reached them) and a region must not be rewritten while a queued copy still reads
it. On CPU it hands back ordinary tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.runtime.staging import HostStaging

ON_CUDA = torch.cuda.is_available()


def test_cpu_values_and_dtypes():
    st = HostStaging(torch.device("cpu"))
    st.begin_step()
    table = np.arange(12, dtype=np.int32).reshape(3, 4)[:, :3]  # a non-contiguous slice, as the runner passes
    got = st.to_device(table, torch.int32)
    assert got.dtype == torch.int32 and got.tolist() == table.tolist()
    got = st.to_device([5, -1, 7], torch.long)
    assert got.dtype == torch.long and got.tolist() == [5, -1, 7]
    assert st.host(np.array([3, 4], dtype=np.int64), torch.int32).tolist() == [3, 4]


def test_region_size_must_keep_views_aligned():
    with pytest.raises(ValueError, match="multiple of 64"):
        HostStaging(torch.device("cpu"), region_bytes=4100)


def test_sampler_copies_go_through_the_step_staging_in_scope():
    """The sampler's small per-step copies use the runner's staging inside ``staging_scope`` (and only for
    that staging's device); outside it they are plain copies."""
    from pagedserve.runtime.sampler import staging_scope, to_device

    class Recording:
        enabled = True
        device = torch.device("cpu")

        def __init__(self):
            self.calls = []

        def to_device(self, values, dtype):
            self.calls.append((list(values), dtype))
            return torch.tensor(values, dtype=dtype)

    rec = Recording()
    with staging_scope(rec):
        got = to_device([0.5, 1.0], torch.float32, torch.device("cpu"))
        other = to_device([1], torch.long, torch.device("meta"))  # another device: not staged
    assert rec.calls == [([0.5, 1.0], torch.float32)] and got.tolist() == [0.5, 1.0]
    assert other.device.type == "meta"
    assert to_device([3], torch.long, torch.device("cpu")).tolist() == [3] and len(rec.calls) == 1


@pytest.mark.skipif(not ON_CUDA, reason="pinned staging is used on CUDA only")
def test_cuda_copies_are_queued_behind_a_busy_gpu_and_regions_are_not_overwritten():
    dev = torch.device("cuda")
    st = HostStaging(dev, region_bytes=4096, depth=3)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on a ~2 GHz clock: the copies queue behind it
    results = []
    for step in range(3):  # as many steps as regions: none has to wait
        st.begin_step()
        a = np.arange(100, dtype=np.int64) + 1000 * step
        b = (np.arange(60, dtype=np.int32) * (step + 1)).reshape(6, 10)
        results.append((a, b, st.to_device(a, torch.long), st.to_device(b, torch.int32)))
    assert not torch.cuda.current_stream().query(), "a staged copy waited for the GPU (pageable behaviour)"
    for step in range(3, 8):  # these reuse regions whose copies were queued behind the sleep
        st.begin_step()
        a = np.arange(100, dtype=np.int64) + 1000 * step
        b = (np.arange(60, dtype=np.int32) * (step + 1)).reshape(6, 10)
        results.append((a, b, st.to_device(a, torch.long), st.to_device(b, torch.int32)))
    big = np.arange(4096, dtype=np.int64)  # larger than a region: copied from pageable memory
    got_big = st.to_device(big, torch.long)
    assert st.pageable_fallbacks == 1
    st.begin_step()  # the regions grow to twice what the last step needed
    assert st.region_bytes >= 2 * (big.nbytes + 100 * 8)
    got_big2 = st.to_device(big[::-1].copy(), torch.long)
    assert st.pageable_fallbacks == 1, "after growing, the same inputs fit"
    torch.cuda.synchronize()
    assert got_big.cpu().tolist() == big.tolist()
    assert got_big2.cpu().tolist() == big[::-1].tolist()
    for step, (a, b, da, db) in enumerate(results):
        assert da.dtype == torch.long and db.dtype == torch.int32 and tuple(db.shape) == (6, 10)
        assert torch.equal(da.cpu(), torch.from_numpy(a)), f"step {step}: int64 input overwritten"
        assert torch.equal(db.cpu(), torch.from_numpy(b)), f"step {step}: int32 input overwritten"
