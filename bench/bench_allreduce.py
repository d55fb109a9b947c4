"""All-reduce latency at tensor-parallel decode sizes: NCCL against pagedserve's one-shot peer all-reduce
(``pagedserve.runtime.parallel.PeerAllReduce``, torch symmetric memory), both through ``TPGroup.all_reduce``
as the model calls it, eager and captured in a CUDA graph. Also checks that both give the same sums.

    python3 bench/bench_allreduce.py --out bench/results/allreduce_h200x2.json     # on nvidia-h200-x2

A decode step of Llama-3.1-8B at TP=N makes 64 of these (two per layer) on [batch, 4096] bf16. Timing: a
graph of ``--ops`` all-reduces, replayed, divided by ``--ops`` (what a captured decode step pays per call).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket

for _key, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                     "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from gpu_common import environment, graph_us_per_call  # noqa: E402  (bench/ is the script's directory)

BATCHES = (1, 8, 32, 128, 256)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _norm_timings(nccl_tp, peer_tp, work: torch.Tensor, ops: int, gen) -> dict:
    """Microseconds per (all-reduce, residual add, RMSNorm) three ways: NCCL then the norm kernel, the one-shot
    peer all-reduce then the norm kernel, and the all-reduce inside the norm's kernel (slots alternating)."""
    from pagedserve.kernels import fused_add_rms_norm

    res = torch.randn(work.shape, device=work.device, dtype=work.dtype, generator=gen)
    weight = torch.randn(work.shape[-1], device=work.device, dtype=work.dtype, generator=gen)
    out = {"nccl_then_norm_us": graph_us_per_call(
        lambda: [fused_add_rms_norm(nccl_tp.all_reduce(work), res, weight, 1e-5) for _ in range(ops)], ops)}
    if peer_tp is not None:
        out["peer_then_norm_us"] = graph_us_per_call(
            lambda: [fused_add_rms_norm(peer_tp.all_reduce(work), res, weight, 1e-5) for _ in range(ops)], ops)
        calls = [0]

        def fused():
            calls[0] += 1
            return peer_tp.add_rms_norm(work, res, weight, 1e-5, calls[0] % 2)

        out["fused_norm_us"] = graph_us_per_call(lambda: [fused() for _ in range(ops)], ops)
        if peer_tp.peer.ll:  # the same with the flag version where the LL one served (PAGEDSERVE_TP_LL)
            peer_tp.peer.ll = False
            out["fused_norm_flags_us"] = graph_us_per_call(lambda: [fused() for _ in range(ops)], ops)
            peer_tp.peer.ll = True
    return out


def _rank_main(rank: int, world: int, port: int, ops: int, hidden: int, queue) -> None:
    from pagedserve.runtime.parallel import TPGroup, make_peer_all_reduce

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, device_id=dev)
    group = dist.new_group(list(range(world)))
    peer = make_peer_all_reduce(group, dev, torch.bfloat16)
    nccl_tp = TPGroup(rank, world, group)
    peer_tp = TPGroup(rank, world, group, peer)
    res: dict = {"peer_available": peer is not None, "rows": []}
    gen = torch.Generator(device=dev).manual_seed(1234 + rank)
    for bs in BATCHES:
        x = torch.randn(bs, hidden, device=dev, dtype=torch.bfloat16, generator=gen)
        row = {"batch": bs, "bytes": x.numel() * x.element_size()}
        want = nccl_tp.all_reduce(x.clone())
        if peer is not None:
            got = peer_tp.all_reduce(x.clone())
            row["max_abs_diff_vs_nccl"] = (got.float() - want.float()).abs().max().item()
            # Inside a graph too: the same input, reduced by a replay, equals NCCL's eager result.
            buf = x.clone()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                peer_tp.all_reduce(buf)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                peer_tp.all_reduce(buf)
            buf.copy_(x)
            g.replay()
            torch.cuda.synchronize()
            row["graph_max_abs_diff_vs_nccl"] = (buf.float() - want.float()).abs().max().item()
        work = x.clone()
        row["nccl_graph_us"] = graph_us_per_call(lambda w=work: [nccl_tp.all_reduce(w) for _ in range(ops)], ops)
        if peer is not None:
            row["peer_graph_us"] = graph_us_per_call(lambda w=work: [peer_tp.all_reduce(w) for _ in range(ops)],
                                                     ops)
        # What the model does after o_proj / down_proj: all-reduce, residual add, RMSNorm.
        row.update(_norm_timings(nccl_tp, peer_tp if peer is not None else None, work, ops, gen))
        res["rows"].append(row)
    if rank == 0:
        queue.put(res)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--ops", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world:
        raise SystemExit(f"needs {args.world} GPUs, {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_rank_main, args=(args.world, _free_port(), args.ops, args.hidden, queue),
                       nprocs=args.world, join=True, start_method="spawn")
    res = queue.get()
    result = {"env": environment(), "args": vars(args), **res}
    nan = float("nan")
    print("| batch | bytes | NCCL | one-shot peer | NCCL + add&norm | one-shot + add&norm | fused in norm | "
          "fused, flag version | max diff vs NCCL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['batch']} | {r['bytes']} | {r['nccl_graph_us']:.1f} | {r.get('peer_graph_us', nan):.1f} | "
              f"{r['nccl_then_norm_us']:.1f} | {r.get('peer_then_norm_us', nan):.1f} | {r.get('fused_norm_us', nan):.1f} | "
              f"{r.get('fused_norm_flags_us', nan):.1f} | {r.get('max_abs_diff_vs_nccl')} / graph {r.get('graph_max_abs_diff_vs_nccl')} |")
    print("(microseconds per call, from a replayed CUDA graph of --ops calls)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
