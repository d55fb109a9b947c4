"""The one-shot peer all-reduce (``PeerAllReduce``, torch symmetric memory) and the all-reduce fused into the
RMSNorm (``TPGroup.add_rms_norm``) against NCCL's all-reduce on the same inputs, eagerly and replayed from a
CUDA graph, through ``TPGroup`` as the model calls them.
Needs two CUDA GPUs (skipped elsewhere); on CPU the selection itself is checked: gloo never gets it."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

from pagedserve.runtime.parallel import ALLREDUCE_ENV, TPGroup, make_peer_all_reduce

SIZES = [(1, 4096), (3, 4096), (256, 4096), (5, 1000)]  # up to the decode maximum; one odd length


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, queue) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=dev)
    group = dist.new_group(list(range(world)))
    peer = make_peer_all_reduce(group, dev, torch.bfloat16)
    nccl_tp, peer_tp = TPGroup(rank, world, group), TPGroup(rank, world, group, peer)
    results = {"peer": peer is not None, "cases": []}
    gen = torch.Generator(device=dev).manual_seed(7 + rank)
    for shape in SIZES:
        x = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
        want = nccl_tp.all_reduce(x.clone()).float().cpu()
        eager = peer_tp.all_reduce(x.clone()).float().cpu()
        # Captured: several calls in one graph, each on the previous one's output (the model's pattern).
        buf = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            peer_tp.all_reduce(buf)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(3):
                peer_tp.all_reduce(buf)
                buf.mul_(0.5)
        buf.copy_(x)
        graph.replay()
        ref = x.clone()
        for _ in range(3):
            nccl_tp.all_reduce(ref)
            ref.mul_(0.5)
        torch.cuda.synchronize()
        results["cases"].append((shape, want.numpy(), eager.numpy(), ref.float().cpu().numpy(), buf.float().cpu().numpy()))
    results["norm"] = _fused_norm_cases(rank, peer_tp, nccl_tp, dev, gen)
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _np(tensors):
    """Plain arrays for the result queue: tensors would be shared by file descriptor, which fails once the
    sending rank has exited."""
    return [t.float().cpu().numpy() for t in tensors]


def _fused_norm_cases(rank, peer_tp, nccl_tp, dev, gen):
    """TPGroup.add_rms_norm (all-reduce in the norm's kernel) against NCCL's all-reduce + fused_add_rms_norm:
    one call per shape, then a captured chain of 64 calls alternating slots (a decode step's pattern),
    replayed 20 times, each call feeding the next."""
    from pagedserve.kernels import fused_add_rms_norm

    cases = []
    hidden = 4096
    weight = torch.randn(hidden, device=dev, dtype=torch.bfloat16, generator=gen)
    for case, rows in enumerate((1, 7, 16, 100, 256)):
        assert peer_tp.reduces_in_norm(torch.empty(rows, hidden, device=dev, dtype=torch.bfloat16))
        x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        res = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        got = peer_tp.add_rms_norm(x, res, weight, 1e-5, case % 2)  # consecutive calls alternate slots
        want = fused_add_rms_norm(nccl_tp.all_reduce(x.clone()), res, weight, 1e-5)
        cases.append((f"rows {rows}", _np(got), _np(want)))

    def chain(step, x, res):
        for i in range(64):
            x, res = step(x, res, i % 2)
            x = x * 0.25  # keep magnitudes tame; a different input for every call
        return x, res

    # 4 rows: the LL kernel (flag in each word); then the same chain with the flag version.
    for ll in (True, False):
        peer_tp.peer.ll, ll_before = ll and peer_tp.peer.ll, peer_tp.peer.ll
        x0 = torch.randn(4, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        r0 = torch.randn(4, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        want = chain(lambda x, r, s: fused_add_rms_norm(nccl_tp.all_reduce(x.clone()), r, weight, 1e-5), x0, r0)
        xin, rin = x0.clone(), r0.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain(lambda x, r, s: peer_tp.add_rms_norm(x, r, weight, 1e-5, s), xin, rin)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(lambda x, r, s: peer_tp.add_rms_norm(x, r, weight, 1e-5, s), xin, rin)
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        kind = "LL" if peer_tp.peer.ll else "flags"
        cases.append((f"graph chain x20 ({kind})", _np(out), _np(want)))
        # Fresh inputs before each of a few more replays: a call that took the previous replay's words (or
        # flags) would hand over the previous inputs' sums, which the same inputs above could not show.
        for rep in range(3):
            xin.copy_(torch.randn(xin.shape, device=dev, dtype=xin.dtype, generator=gen))
            rin.copy_(torch.randn(rin.shape, device=dev, dtype=rin.dtype, generator=gen))
            want = chain(lambda x, r, s: fused_add_rms_norm(nccl_tp.all_reduce(x.clone()), r, weight, 1e-5),
                         xin.clone(), rin.clone())
            graph.replay()
            torch.cuda.synchronize()
            cases.append((f"graph chain, fresh inputs {rep} ({kind})", _np(out), _np(want)))
        peer_tp.peer.ll = ll_before

    return cases


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(0, 1),
    reason="needs 2 CUDA GPUs with peer access",
)
def test_peer_all_reduce_and_fused_norm_match_nccl_eager_and_in_a_graph():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_rank, args=(2, _free_port(), queue), nprocs=2, join=False, start_method="spawn")
    try:
        results = queue.get(timeout=180)  # before joining: rank 0 cannot exit until its results are read
    finally:
        deadline = time.monotonic() + 120
        while not procs.join(timeout=5):  # raises with the rank's traceback if one failed
            if time.monotonic() > deadline:  # a rank stuck in a kernel: do not hang the test run
                for p in procs.processes:
                    p.kill()
                pytest.fail("a rank did not exit within 120 s of its results")
    assert results["peer"], "the one-shot all-reduce was not set up on two GPUs"
    for shape, *arrays in results["cases"]:
        want, eager, ref, graphed = (torch.from_numpy(a) for a in arrays)
        torch.testing.assert_close(eager, want, rtol=1.6e-2, atol=1e-2, msg=f"eager {shape}")
        torch.testing.assert_close(graphed, ref, rtol=1.6e-2, atol=1e-2, msg=f"graph {shape}")
    for what, got, want in results["norm"]:  # (normed, residual) pairs
        for g, w, name in zip(got, want, ("normed", "residual"), strict=True):
            g, w = torch.from_numpy(g), torch.from_numpy(w)
            torch.testing.assert_close(g, w, rtol=1.6e-2, atol=1.6e-2, msg=f"fused norm, {what}, {name}")


def test_no_peer_all_reduce_on_cpu_or_when_switched_off(monkeypatch):
    assert make_peer_all_reduce(None, torch.device("cpu"), torch.float32) is None
    monkeypatch.setenv(ALLREDUCE_ENV, "nccl")
    assert make_peer_all_reduce(None, torch.device("cuda", 0), torch.bfloat16) is None
    monkeypatch.setenv(ALLREDUCE_ENV, "fastest")
    with pytest.raises(ValueError, match=ALLREDUCE_ENV):
        make_peer_all_reduce(None, torch.device("cpu"), torch.float32)
