"""Benchmark 1 of issue 9: the attention kernels against the card's own ceilings and torch SDPA.

Measures, in one run on one GPU:
- the ceilings: device-to-device copy GB/s (bytes read + written) and an 8192^3 bf16 matmul's TFLOP/s;
- decode attention GB/s (bytes of K/V, q and out) at batch 1/32/128 x context 512/2048/8192 with
  Llama-3.1-8B's heads (32 q / 8 KV, head_dim 128, bf16, block size 16, shuffled block ids), next to the copy
  bandwidth and to torch SDPA on the same data laid out contiguously ([batch, kv_heads, ctx, head_dim], the
  group's query heads folded into the query length so SDPA also reads K/V once per KV head);
- prefill attention TFLOP/s (causal) next to SDPA's flash backend, and one extend shape (queries after a
  cached prefix) on its own;
- with ``--sweep``, a few tile configurations of both kernels at the shapes that matter for the targets.

Every timing is ``triton.testing.do_bench``'s median (it clears L2 before each run) of a CUDA-graph replay,
cycling through several input sets when one set is smaller than 4x L2. The copy, the default decode kernel and
SDPA's decode are also timed back to back (``time_ms_stream``: many calls in one graph), which spreads the graph
launch and the write-back of the L2 flush's dirty lines over many calls. Prints a table last and writes JSON.

    PYTHONPATH=/tmp/pp python bench/bench_kernels.py --sweep --json bench/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from pagedserve.kernels import reference
from pagedserve.kernels import triton_attention as attn

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
SCALE = HEAD_DIM**-0.5


# ------------------------------------------------------------------------------------------- timing
def graph_of(fn) -> torch.cuda.CUDAGraph:
    """``fn`` captured as a CUDA graph (after a warm-up that compiles it), as the engine runs decode."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph


def time_ms(fns) -> float:
    """Median ms of one call, cycling through the callables (one per rotated input set) as CUDA graphs."""
    graphs = [graph_of(fn) for fn in fns]
    cycle = itertools.cycle(graphs)
    return float(do_bench(lambda: next(cycle).replay(), warmup=25, rep=150, return_mode="median"))


def time_ms_stream(fns, bytes_per_call: int, min_bytes: int = 4 << 30) -> float:
    """ms of one call at steady state: one CUDA graph holding the calls back to back (passes over the rotated
    input sets until ``min_bytes`` have moved, at least 8 calls), ``do_bench``'s median replay divided by the
    number of calls. ``time_ms`` charges each call with a graph launch and with writing back the dirty lines
    ``do_bench``'s L2 flush leaves behind (up to an L2 of bytes); here both are spread over many calls, as a
    model's 32 layers see them. Pass at least two input sets larger than L2 so no call reads the last one's."""
    for fn in fns:
        fn()
    calls = max(8, len(fns), -(-min_bytes // max(1, bytes_per_call)))
    passes = -(-calls // len(fns))
    graph = graph_of(lambda: [fn() for _ in range(passes) for fn in fns])
    ms = float(do_bench(graph.replay, warmup=25, rep=200, return_mode="median"))
    return ms / (passes * len(fns))


def rotations(bytes_per_set: int, l2_bytes: int) -> int:
    """Input sets to cycle through so that together they are at least 4x L2 (back to back, no call may find
    the previous one's bytes in L2)."""
    return max(1, min(256, math.ceil(4 * l2_bytes / max(1, bytes_per_set))))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------------------- ceilings
def measure_ceilings() -> dict:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.randn(n, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_ms = float(do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median"))
    # Back to back in a graph, `copy_` measured 2,446 GB/s on an H100 against 3,016 eager (a graph memcpy node,
    # presumably run by the copy engines), so the back-to-back ceiling is an SM kernel that copies: x * 1.
    copy_stream_ms = time_ms_stream([lambda: torch.mul(src, 1, out=dst)], 2 * 2 * n)
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=DTYPE)
    b = torch.randn(m, m, device="cuda", dtype=DTYPE)
    mm_ms = float(do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median"))
    return {
        "copy_bytes": 2 * 2 * n,
        "copy_ms": copy_ms,
        "copy_gbs": 2 * 2 * n / copy_ms / 1e6,
        "copy_stream_ms": copy_stream_ms,
        "copy_stream_gbs": 2 * 2 * n / copy_stream_ms / 1e6,
        "matmul_shape": [m, m, m],
        "matmul_ms": mm_ms,
        "matmul_tflops": 2 * m**3 / mm_ms / 1e9,
    }


# ------------------------------------------------------------------------------------------ inputs
class PagedSet:
    """One input set: packed q, a paged cache with shuffled block ids, and the same K/V contiguous."""

    def __init__(self, batch: int, seq_len: int, q_len: int, contiguous: bool, gen: torch.Generator,
                 heads_outer: bool = False):
        blocks_per_seq = -(-seq_len // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        if heads_outer:  # [blocks, kv_heads, block_size, head_dim] in memory: each (block, head) one 4 KB run
            alloc = (num_blocks, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
            self.k_cache = torch.randn(alloc, device="cuda", dtype=DTYPE, generator=gen).transpose(1, 2)
            self.v_cache = torch.randn(alloc, device="cuda", dtype=DTYPE, generator=gen).transpose(1, 2)
        else:
            self.k_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
            self.v_cache = torch.randn(shape, device="cuda", dtype=DTYPE, generator=gen)
        ids = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
        self.block_tables = ids.view(batch, blocks_per_seq).contiguous()
        self.seq_lens = torch.full((batch,), seq_len, device="cuda", dtype=torch.int32)
        self.query_start_loc = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len
        self.q = torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)
        self.out = torch.empty_like(self.q)
        self.batch, self.seq_len, self.q_len = batch, seq_len, q_len
        if contiguous:
            self.k = self._gather(self.k_cache)
            self.v = self._gather(self.v_cache)

    def _gather(self, cache: torch.Tensor) -> torch.Tensor:
        """[batch, kv_heads, seq_len, head_dim] contiguous copy of the paged cache."""
        blocks = cache[self.block_tables.long()]  # [batch, blocks, block_size, kv_heads, head_dim]
        flat = blocks.reshape(self.batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, : self.seq_len]
        return flat.permute(0, 2, 1, 3).contiguous()

    def kv_write_then(self, **launch_kwargs):
        """This step's K/V written into the cache (a short PDL kernel), then the attention call."""
        from pagedserve.kernels import pdl, triton_pointwise

        key = torch.randn(self.batch, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        slots = (self.block_tables[:, -1].long() * BLOCK_SIZE).contiguous()
        attend = self.triton_call(**launch_kwargs)

        def call():
            pdl.set_enabled(launch_kwargs.get("pdl", True))
            try:
                triton_pointwise.write_kv_cache(key, key, self.k_cache, self.v_cache, slots)
            finally:
                pdl.set_enabled(None)
            attend()

        return call

    def triton_call(self, **launch_kwargs):
        def call():
            attn.paged_attention_launch(
                self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens, self.query_start_loc,
                SCALE, out=self.out, max_query_len=self.q_len, max_seq_len=self.seq_len, **launch_kwargs,
            )

        return call


def kv_bytes(batch: int, seq_len: int) -> int:
    return 2 * batch * seq_len * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


# ------------------------------------------------------------------------------------------ decode
def decode_case(batch: int, ctx: int, l2: int, configs: dict[str, dict], heads_outer: bool = False) -> dict:
    """GB/s of each Triton config and of SDPA on contiguous K/V, over the same rotated input sets."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 100003 + ctx)
    moved = kv_bytes(batch, ctx) + 2 * batch * NUM_HEADS * HEAD_DIM * DTYPE.itemsize  # + q and out
    sets = [PagedSet(batch, ctx, 1, True, gen) for _ in range(max(2, rotations(moved, l2)))]
    group = NUM_HEADS // NUM_KV_HEADS
    row = {"batch": batch, "ctx": ctx, "bytes": moved, "rotations": len(sets)}

    def sdpa(s: PagedSet):
        q = s.q.view(batch, NUM_KV_HEADS, group, HEAD_DIM)  # the group's heads as query rows
        return lambda: F.scaled_dot_product_attention(q, s.k, s.v, scale=SCALE)

    ref = sdpa(sets[0])().reshape(batch, NUM_HEADS, HEAD_DIM)
    for name, kwargs in configs.items():
        ms = time_ms([s.triton_call(**kwargs) for s in sets])
        row[f"{name}_ms"], row[f"{name}_gbs"] = ms, moved / ms / 1e6
        sets[0].out.fill_(float("nan"))  # every configuration must compute the same function
        sets[0].triton_call(**kwargs)()
        row[f"{name}_rel_err_vs_sdpa"] = rel_err(sets[0].out, ref)
    ms = time_ms([sdpa(s) for s in sets])
    row["sdpa_ms"], row["sdpa_gbs"] = ms, moved / ms / 1e6
    # Back to back (time_ms_stream): the default kernel, without PDL, with the decode kernel launched late; then
    # as in a model, each attention call right after a short PDL kernel (this step's K/V write) in the same three
    # modes; and SDPA.
    stream = {
        "triton": [s.triton_call() for s in sets],
        "no_pdl": [s.triton_call(pdl=False) for s in sets],
        "late": [s.triton_call(dec_early=False) for s in sets],
        "kvw": [s.kv_write_then() for s in sets],
        "kvw_late": [s.kv_write_then(dec_early=False) for s in sets],
        "kvw_no_pdl": [s.kv_write_then(pdl=False) for s in sets],
        "sdpa": [sdpa(s) for s in sets],
    }
    for name, fns in stream.items():
        ms = time_ms_stream(fns, moved)
        row[f"{name}_stream_ms"], row[f"{name}_stream_gbs"] = ms, moved / ms / 1e6
    row["rel_err_vs_sdpa"] = row.pop("triton_rel_err_vs_sdpa")
    if heads_outer:  # the same kernel over a cache laid out [blocks, kv_heads, block_size, head_dim]
        del sets
        torch.cuda.empty_cache()
        gen.manual_seed(batch * 100003 + ctx)
        sets = [PagedSet(batch, ctx, 1, True, gen, heads_outer=True) for _ in range(max(2, rotations(moved, l2)))]
        sets[0].out.fill_(float("nan"))
        sets[0].triton_call()()
        row["hnd_rel_err_vs_sdpa"] = rel_err(sets[0].out, sdpa(sets[0])().reshape(batch, NUM_HEADS, HEAD_DIM))
        ms = time_ms([s.triton_call() for s in sets])
        row["hnd_ms"], row["hnd_gbs"] = ms, moved / ms / 1e6
        ms = time_ms_stream([s.triton_call() for s in sets], moved)
        row["hnd_stream_ms"], row["hnd_stream_gbs"] = ms, moved / ms / 1e6
    del sets
    torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------------------- prefill
def causal_flops(batch: int, seq_len: int, q_len: int) -> int:
    prefix = seq_len - q_len
    pairs = q_len * prefix + q_len * (q_len + 1) // 2
    return 4 * HEAD_DIM * NUM_HEADS * batch * pairs


def sdpa_flash(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Causal SDPA forced onto the flash backend; K/V heads expanded if that backend lacks GQA here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(k_, v_, **kw):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q4, k_, v_, is_causal=True, scale=SCALE, **kw)

    try:
        run(k, v, enable_gqa=True)
        return (lambda: run(k, v, enable_gqa=True)), "flash, enable_gqa"
    except (RuntimeError, TypeError):
        group = NUM_HEADS // NUM_KV_HEADS
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return (lambda: run(ke, ve)), "flash, K/V heads expanded"


def prefill_case(batch: int, seq_len: int, q_len: int, l2: int, configs: dict[str, dict]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(7 * batch + seq_len + q_len)
    flops = causal_flops(batch, seq_len, q_len)
    full = q_len == seq_len
    moved = kv_bytes(batch, seq_len) + 2 * batch * q_len * NUM_HEADS * HEAD_DIM * DTYPE.itemsize
    sets = [PagedSet(batch, seq_len, q_len, full, gen) for _ in range(rotations(moved, l2))]
    row = {"batch": batch, "seq_len": seq_len, "q_len": q_len, "flops": flops, "rotations": len(sets)}
    s = sets[0]
    if full:  # SDPA's is_causal aligns the mask top-left, which only matches a prefill without prefix
        calls = []
        for t in sets:
            q4 = t.q.view(batch, seq_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
            fn, how = sdpa_flash(q4, t.k, t.v)
            calls.append(fn)
        ms = time_ms(calls)
        row["sdpa_flash_ms"], row["sdpa_flash_tflops"], row["sdpa_how"] = ms, flops / ms / 1e9, how
        q4 = s.q.view(batch, seq_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        ref, ref_rows, ref_name = sdpa_flash(q4, s.k, s.v)[0]().transpose(1, 2).reshape_as(s.out), None, "sdpa"
    else:
        # Check the first sequence against the fp32 torch reference (a CPU function).
        ref_rows = slice(0, q_len)
        ref = reference.paged_attention(
            s.q[ref_rows].float().cpu(), s.k_cache.float().cpu(), s.v_cache.float().cpu(),
            s.block_tables[:1].cpu(), s.seq_lens[:1].cpu(), torch.tensor([0, q_len], dtype=torch.int32), SCALE,
        )
        ref_name = "reference"
    for name, kwargs in configs.items():
        ms = time_ms([t.triton_call(**kwargs) for t in sets])
        row[f"{name}_ms"], row[f"{name}_tflops"] = ms, flops / ms / 1e9
        s.out.fill_(float("nan"))
        s.triton_call(**kwargs)()
        out = s.out if ref_rows is None else s.out[ref_rows]
        row[f"{name}_rel_err_vs_{ref_name}"] = rel_err(out.cpu(), ref.cpu())
    row[f"rel_err_vs_{ref_name}"] = row.pop(f"triton_rel_err_vs_{ref_name}")
    del sets
    torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------ driver
DECODE_SWEEP = {
    "per_sm1": dict(dec_programs_per_sm=1),
    "per_sm3": dict(dec_programs_per_sm=3),
    "w2": dict(dec_warps=2),
    "w2_per_sm4": dict(dec_warps=2, dec_programs_per_sm=4),
    "w2_bn32_per_sm4": dict(dec_warps=2, dec_block_n=32, dec_programs_per_sm=4),
    "w2_bn128": dict(dec_warps=2, dec_block_n=128),
    "s1": dict(dec_stages=1),
    "s4_per_sm1": dict(dec_stages=4, dec_programs_per_sm=1),
    "s4": dict(dec_stages=4),
    "s5": dict(dec_stages=5),
    "per_sm4": dict(dec_programs_per_sm=4),
    "per_sm8": dict(dec_programs_per_sm=8),
    "bn32_s4": dict(dec_block_n=32, dec_stages=4),
    "bn32_s6_per_sm4": dict(dec_block_n=32, dec_stages=6, dec_programs_per_sm=4),
    "bn128_s2": dict(dec_block_n=128, dec_stages=2),
    "bn128_w8": dict(dec_block_n=128, dec_warps=8),
    "w8": dict(dec_warps=8),
    "w8_s4_per_sm1": dict(dec_warps=8, dec_stages=4, dec_programs_per_sm=1),
}
PREFILL_SWEEP = {
    "m128_n128_w8_s3": dict(pf_block_m=128, pf_block_n=128, pf_warps=8, pf_stages=3),
    "m64_n64_w4_s3": dict(pf_block_m=64, pf_block_n=64, pf_warps=4, pf_stages=3),
    "m64_n64_w4_s4": dict(pf_block_m=64, pf_block_n=64, pf_warps=4, pf_stages=4),
    "m64_n32_w4_s3": dict(pf_block_m=64, pf_block_n=32, pf_warps=4, pf_stages=3),
    "m128_n64_w4_s3": dict(pf_block_m=128, pf_block_n=64, pf_warps=4, pf_stages=3),
}


def kernel_resources() -> dict:
    """Registers, spills and shared memory of every compiled variant of the attention kernels."""
    report = {}
    for name in ("_decode_kernel", "_prefill_kernel", "_merge_kernel"):
        variants = []
        for cache in getattr(getattr(attn, name), "device_caches", {}).values():
            kernels = cache[0] if isinstance(cache, tuple) else cache
            for compiled in kernels.values():
                meta = getattr(compiled, "metadata", None)
                variants.append({
                    "n_regs": getattr(compiled, "n_regs", None),
                    "n_spills": getattr(compiled, "n_spills", None),
                    "shared": getattr(meta, "shared", None),
                    "num_warps": getattr(meta, "num_warps", None),
                    "num_stages": getattr(meta, "num_stages", None),
                })
        report[name] = variants
    return report


def gpu_slug(name: str) -> str:
    match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name.replace("NVIDIA ", ""))
    return (match.group(1) if match else re.sub(r"\W+", "_", name)).lower()


def versions() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "l2_bytes": torch.cuda.get_device_properties(0).L2_cache_size,
    }
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def guarded(results: dict, label: str, fn):
    """``fn()``, or None with the traceback kept under ``results["errors"][label]``: one broken shape must
    not lose the other numbers of a run."""
    try:
        return fn()
    except Exception:
        results.setdefault("errors", {})[label] = traceback.format_exc()
        print(results["errors"][label], file=sys.stderr, flush=True)
        return None


def best_variant(row: dict, suffix: str) -> str:
    """The fastest swept configuration of a row, as 'name value' (empty without a sweep)."""
    swept = {name: row[name + suffix] for name in (*DECODE_SWEEP, *PREFILL_SWEEP) if name + suffix in row}
    if not swept:
        return ""
    name = max(swept, key=swept.get)
    return f"  best swept: {name} {swept[name]:,.0f}"


def print_table(res: dict) -> None:
    ceil = res.get("ceilings", {})
    copy = ceil.get("copy_gbs", float("nan"))
    print(f"\n{res['versions']['gpu']}  torch {res['versions']['torch']}  triton {res['versions']['triton']}")
    copy_stream = ceil.get("copy_stream_gbs", float("nan"))
    print(f"ceilings: copy {copy:,.0f} GB/s (back to back: {copy_stream:,.0f})   "
          f"bf16 matmul {ceil.get('matmul_tflops', float('nan')):,.0f} TFLOP/s")
    print("decode (GB/s of K/V+q+out)   batch   ctx   triton  %copy    sdpa  triton/sdpa  err        no PDL"
          "   | back to back: triton %copy    sdpa  triton/sdpa")
    # Both %copy columns divide by do_bench's copy (the ceiling); the back-to-back copy is printed above.
    nan = float("nan")
    for r in res.get("decode", []):
        t, s = r["triton_gbs"], r["sdpa_gbs"]
        ts, ss = r.get("triton_stream_gbs", nan), r.get("sdpa_stream_gbs", nan)
        print(f"{'':29}{r['batch']:>5} {r['ctx']:>5} {t:8,.0f} {100 * t / copy:5.1f}% {s:7,.0f} "
              f"{t / s:8.2f}x  {r['rel_err_vs_sdpa']:.1e}  {r.get('no_pdl_gbs', nan):8,.0f}"
              f"   | {ts:8,.0f} {100 * ts / copy:5.1f}% {ss:7,.0f} {ts / ss:8.2f}x"
              f" no PDL {r.get('no_pdl_stream_gbs', nan):7,.0f}"
              f"{best_variant(r, '_gbs')}")
    print("prefill (TFLOP/s, causal)    batch  seq_len q_len  triton  sdpa-flash  ratio")
    for r in res.get("prefill", []):
        s = r.get("sdpa_flash_tflops")
        ratio = f"{r['triton_tflops'] / s:6.2f}" if s else "   n/a"
        print(f"{'':29}{r['batch']:>5} {r['seq_len']:>7} {r['q_len']:>5} {r['triton_tflops']:7.1f} "
              f"{s if s else float('nan'):10.1f} {ratio}{best_variant(r, '_tflops')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="output path (default bench/results/kernels_<gpu>.json)")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configurations")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill shapes")
    parser.add_argument("--heads-outer", action="store_true",
                        help="also time the default decode kernel over a [blocks, kv_heads, block_size, head_dim] cache")
    parser.add_argument("--decode-configs", default="",
                        help=f"named decode configurations to time at every decode shape (from {sorted(DECODE_SWEEP)})")
    parser.add_argument("--decode-shapes", default="1x512,1x2048,1x8192,32x512,32x2048,32x8192,128x512,128x2048,128x8192",
                        help="decode shapes as BATCHxCONTEXT, comma-separated")
    args = parser.parse_args()
    unknown = sorted(set(filter(None, args.decode_configs.split(","))) - set(DECODE_SWEEP))
    if unknown:
        raise SystemExit(f"--decode-configs: unknown {unknown}; known: {sorted(DECODE_SWEEP)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                   "block_size": BLOCK_SIZE, "dtype": str(DTYPE)},
        "default_config": attn._config(HEAD_DIM, False, 2048),
    }
    l2 = res["versions"]["l2_bytes"]
    res["ceilings"] = guarded(res, "ceilings", measure_ceilings) or {}
    print("ceilings", res.get("ceilings"), flush=True)

    def decode_all():
        rows = []
        for batch, ctx in (tuple(int(v) for v in shape.split("x")) for shape in args.decode_shapes.split(",")):
            # The default next to the same kernels launched without programmatic dependent launch, same run.
            configs = {"triton": {}, "no_pdl": dict(pdl=False)}
            if args.sweep and batch >= 32 and ctx >= 2048:
                configs.update(DECODE_SWEEP)
            configs.update({name: DECODE_SWEEP[name] for name in args.decode_configs.split(",") if name})
            row = guarded(res, f"decode {batch}x{ctx}", lambda: decode_case(batch, ctx, l2, configs, heads_outer=args.heads_outer))  # noqa: B023
            if row:
                rows.append(row)
                print("decode", row, flush=True)
        return rows

    def prefill_all():
        rows = []
        for batch, seq_len, q_len in ((8, 2048, 2048), (1, 8192, 8192), (32, 512, 512), (8, 4096, 512)):
            configs = {"triton": {}}
            if args.sweep and q_len == seq_len:
                configs.update(PREFILL_SWEEP)
            row = guarded(res, f"prefill {batch}x{seq_len}/{q_len}",
                          lambda: prefill_case(batch, seq_len, q_len, l2, configs))  # noqa: B023
            if row:
                rows.append(row)
                print("prefill", row, flush=True)
        return rows

    res["decode"] = decode_all()
    res["prefill"] = [] if args.decode_only else prefill_all()
    res["kernel_resources"] = guarded(res, "kernel_resources", kernel_resources)
    path = args.json or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{gpu_slug(res['versions']['gpu'])}.json"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")
    print_table(res)


if __name__ == "__main__":
    main()
