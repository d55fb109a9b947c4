"""Decode-shaped matmuls (M = 1..8 rows) of Llama-3.1-8B at TP=1 and TP=2: cuBLAS (F.linear) against the
Triton GEMV in kernels/triton_gemv.py, each as a CUDA graph of 32 calls on 32 different weight matrices
(as a decode step meets them: no weight is in L2 when its turn comes). Reports us per call and GB/s of
weight read, next to the device-to-device copy bandwidth.

    python3 bench/bench_gemv.py --out bench/results/gemv_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

SHAPES = {  # name: (K, N) of y = x @ W.T, W [N, K]
    "qkv tp1": (4096, 6144), "o tp1": (4096, 4096), "gate_up tp1": (4096, 28672), "down tp1": (14336, 4096),
    "qkv tp2": (4096, 3072), "o tp2": (2048, 4096), "gate_up tp2": (4096, 14336), "down tp2": (7168, 4096),
}
LAYERS = 32


def main() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_common import environment, graph_us_per_call, measure_ceilings

    from pagedserve.kernels import _gemv_launch
    from pagedserve.kernels.triton_gemv import gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    ap.add_argument("--block-n", default="4,8,16")
    ap.add_argument("--block-k", default="256,512")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--stages", default="3,5")
    ap.add_argument("--pre-k", default="0", help="columns loaded before the PDL wait (0: one tile)")
    ap.add_argument("--table-out", default=None,
                    help="write the fastest launch per shape (or \"cublas\") as a PAGEDSERVE_GEMV_TABLE file")
    args = ap.parse_args()
    ceil = measure_ceilings()
    result = {"env": environment(), "ceilings": ceil, "rows": []}
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    configs = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, **({"pre_k": pk} if pk else {}))
               for bn, bk, nw, ns, pk in itertools.product(ints(args.block_n), ints(args.block_k), ints(args.warps),
                                                           ints(args.stages), ints(args.pre_k))
               if not pk or (pk > bk and pk % bk == 0)]
    table = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for _ in range(LAYERS)]
        wbytes = n * k * 2
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = F.linear(x, ws[0])
            row = {"shape": name, "K": k, "N": n, "M": m, "weight_MB": wbytes / 1e6,
                   "floor_us": wbytes / ceil["copy_GBps"] / 1e3}
            row["cublas_us"] = graph_us_per_call(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], LAYERS)
            row["cublas_GBps"] = wbytes / row["cublas_us"] / 1e3
            if m == 1:  # the GEMV takes one row (cuBLAS is flat in M up to 8; the GEMV was not)
                best = None
                row["configs"] = []
                engine = _gemv_launch(n, k)  # what the engine launches for this shape (kernels.GEMV_TUNED)
                for cfg in [*configs, *([{**engine, "rule": "engine"}] if engine else [])]:
                    kw = {key: v for key, v in cfg.items() if key != "rule"}
                    err = (gemv(x, ws[0], **kw).float() - ref.float()).abs().max().item()
                    if err > 0.05 * ref.float().abs().max().item():
                        raise SystemExit(f"{name} M={m} {cfg}: max error {err}")
                    us = graph_us_per_call(lambda x=x, ws=ws, kw=kw: [gemv(x, w, **kw) for w in ws], LAYERS)
                    row["configs"].append({**cfg, "us": us})
                    if best is None or us < best[0]:
                        best = (us, cfg)
                row["gemv_us"], row["gemv_config"] = best
                plain = min((c for c in row["configs"] if "pre_k" not in c), key=lambda c: c["us"])  # the engine's
                table[f"{n},{k}"] = "cublas" if row["cublas_us"] < plain["us"] else gemv_spec(plain)
                row["gemv_GBps"] = wbytes / row["gemv_us"] / 1e3
            print(f"{name:12s} M={m}: floor {row['floor_us']:6.1f} us | cuBLAS {row['cublas_us']:6.1f} us "
                  f"({row['cublas_GBps']:5.0f} GB/s)" + (f" | gemv {row['gemv_us']:6.1f} us ({row['gemv_GBps']:5.0f} "
                  f"GB/s) {row['gemv_config']}" if "gemv_us" in row else ""), flush=True)
            result["rows"].append(row)
        del ws
        torch.cuda.empty_cache()
    result["table"] = table
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.table_out:
        with open(args.table_out, "w") as f:
            json.dump(table, f, indent=1)


def gemv_spec(cfg: dict) -> str:
    """The PAGEDSERVE_GEMV_CONFIG / table spelling of a launch (kernels.parse_gemv_spec reads it back)."""
    return f"{cfg['block_n']}x{cfg['block_k']}w{cfg['num_warps']}"


if __name__ == "__main__":
    main()
