"""The Triton kernels against the torch reference, computed in fp32 on the same random inputs.

On a machine with CUDA the kernels run compiled on the GPU with larger shapes. Without CUDA (CI) they run
under the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors and small shapes: nothing here is
skipped for lack of a GPU. The interpreter must be chosen before Triton is imported: ``_load_kernels`` sets the
variable, (re)imports the kernel modules if an earlier import decorated them for a GPU, and fails loudly if any
kernel is still not interpreted. If Triton itself was imported earlier in this process without the interpreter
(its own ``@jit`` helpers, e.g. the reductions' combine functions, are then compiled-mode), the tests of this
file are replaced by one test that runs this file again in a fresh process with ``TRITON_INTERPRET=1``.

Every output is poisoned with NaN first; errors are ‖out − ref‖ / ‖ref‖ with the bounds of the device
docs' METHOD.md (bf16 operands within 1e-2; fp16 tighter).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zlib

import pytest
import torch

from pagedserve.kernels import reference

ON_CUDA = torch.cuda.is_available()
RERUN_IN_SUBPROCESS = (
    not ON_CUDA and "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
KERNEL_MODULES = (
    "pagedserve.kernels.pdl",  # first: the kernel modules below import its jit helpers
    "pagedserve.kernels.triton_attention",
    "pagedserve.kernels.triton_norm",
    "pagedserve.kernels.triton_pointwise",
    "pagedserve.kernels.triton_ops",
    "pagedserve.kernels.triton_gemv",
)
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}


def _jit_functions(module):
    from triton.runtime.jit import KernelInterface

    return [obj for obj in vars(module).values() if isinstance(obj, KernelInterface)]


def _load_kernels():
    if RERUN_IN_SUBPROCESS:
        return None, None, None, None, None, None
    if ON_CUDA:
        return [importlib.import_module(name) for name in KERNEL_MODULES]
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    def all_interpreted(mods):
        return all(isinstance(f, InterpretedFunction) for m in mods for f in _jit_functions(m))

    mods = [importlib.import_module(name) for name in KERNEL_MODULES]
    if not all_interpreted(mods):  # imported earlier in this process without the interpreter
        mods = [importlib.reload(m) for m in mods]
    if not all_interpreted(mods):
        raise RuntimeError("TRITON_INTERPRET=1 did not take effect: the kernels would need a GPU")
    return mods


pdl, attention, norm, pointwise, ops, gemv = _load_kernels()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


def check_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what} shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten or poisoned)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.2e} over {TOL[dtype]:.0e}"


def generator(*key) -> torch.Generator:
    """A seed per test case: different inputs for every case, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(*shape, dtype, gen) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------------------ attention
def make_paged_batch(seq_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, gen):
    """Random q and paged K/V; each sequence's blocks are shuffled, non-contiguous ids; table padding is
    filled with ids of other sequences' blocks so that reading past a sequence's blocks shows in the output."""
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 7
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    ids = torch.randperm(num_blocks, generator=gen)
    width = max(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=gen, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = ids[used : used + n]
        used += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = randn(starts[-1], num_heads, head_dim, dtype=dtype, gen=gen)
    as_int = dict(dtype=torch.int32, device=DEVICE)
    return (q, k_cache, v_cache, block_tables.to(DEVICE), torch.tensor(seq_lens, **as_int),
            torch.tensor(starts, **as_int))


def reference_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    return reference.paged_attention(
        q.float().cpu(), k_cache.float().cpu(), v_cache.float().cpu(), block_tables.cpu(), seq_lens.cpu(),
        query_start_loc.cpu(), scale,
    )


def run_attention(inputs, scale, **kwargs):
    q = inputs[0]
    out = torch.full_like(q, float("nan"))
    result = attention.paged_attention_launch(*inputs, scale, out=out, **kwargs)
    assert result is out
    return out.cpu()


def decode_seq_lens(block_size):
    # Awkward lengths: 1, one past a block, not multiples of the block size, one long sequence.
    if ON_CUDA:
        return [1, block_size + 1, 300, 1000, 2049, 4111, 77]
    return [1, block_size + 1, 45, 100, 67]


DECODE_CASES = [
    (head_dim, group, block_size, torch.bfloat16)
    for head_dim in (64, 128) for group in (1, 4, 8) for block_size in (16, 32)
] + [(64, 4, 16, torch.float16), (128, 4, 32, torch.float16)]


def param_id(value) -> str:
    return str(value).replace("torch.", "")


@pytest.mark.parametrize(("head_dim", "group", "block_size", "dtype"), DECODE_CASES, ids=param_id)
def test_paged_attention_decode(head_dim, group, block_size, dtype):
    num_kv_heads = 4 if ON_CUDA else (2 if group < 8 else 1)
    gen = generator("decode", head_dim, group, block_size, dtype)
    seq_lens = decode_seq_lens(block_size)
    inputs = make_paged_batch(seq_lens, [1] * len(seq_lens), num_kv_heads * group, num_kv_heads, head_dim,
                              block_size, dtype, gen)
    scale = head_dim**-0.5
    ref = reference_attention(*inputs, scale)
    max_seq_len = max(seq_lens)
    block_n = 64 if ON_CUDA else 16
    # The default split heuristic with and without the host-side hints, then many small splits (most of
    # them empty for the short sequences), merged by the last split or by a separate launch; on the GPU
    # also one split per sequence (no merge step). Repeated calls also check that the fused merge leaves
    # its counters at zero (a stale counter would merge too early and fail the next comparison).
    variants = [dict(max_query_len=1, max_seq_len=max_seq_len), dict(),
                dict(max_query_len=1, max_seq_len=max_seq_len, decode_partition=2 * block_n),
                # the separate merge launch instead of the fused one (the last split merges)
                dict(max_query_len=1, max_seq_len=max_seq_len, decode_partition=2 * block_n,
                     dec_fused_merge=False)]
    if ON_CUDA:
        single = -(-max_seq_len // block_n) * block_n
        variants.append(dict(max_query_len=1, max_seq_len=max_seq_len, decode_partition=single))
    for kwargs in variants:
        check_close(run_attention(inputs, scale, **kwargs), ref, dtype, f"decode {kwargs}")


def mixed_batch(block_size):
    """(seq_len, q_len): fresh prefill, extend after a cached prefix, decode, chunked prefill, empty."""
    if ON_CUDA:
        return [(700, 700), (1200, 300), (1, 1), (2050, 1), (129, 129), (33, 0), (513, 17), (300, 2)]
    return [(37, 37), (50, 13), (1, 1), (70, 1), (33, 0), (block_size + 3, 2), (20, 20)]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_mixed_prefill_decode(head_dim, group, block_size):
    dtype = torch.bfloat16
    num_kv_heads = 2 if ON_CUDA or group < 8 else 1
    gen = generator("mixed", head_dim, group, block_size)
    batch = mixed_batch(block_size)
    seq_lens, q_lens = [s for s, _ in batch], [n for _, n in batch]
    inputs = make_paged_batch(seq_lens, q_lens, num_kv_heads * group, num_kv_heads, head_dim, block_size,
                              dtype, gen)
    scale = 0.7 * head_dim**-0.5
    ref = reference_attention(*inputs, scale)
    hinted = run_attention(inputs, scale, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    check_close(hinted, ref, dtype, "mixed batch, hints given")
    starts = inputs[5].tolist()
    for i, (seq_len, q_len) in enumerate(batch):
        if q_len:
            rows = slice(starts[i], starts[i + 1])
            check_close(hinted[rows], ref[rows], dtype, f"sequence {i} (seq_len {seq_len}, q_len {q_len})")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_attention_short_extends(head_dim):
    """Query lengths 2..8 over long contexts (speculative tokens, small chunks): the small prefill tiles."""
    dtype = torch.float16
    gen = generator("short", head_dim)
    batch = [(900, 8), (257, 3), (64, 2), (1500, 5)] if ON_CUDA else [(90, 8), (25, 3), (16, 2), (41, 5)]
    seq_lens, q_lens = [s for s, _ in batch], [n for _, n in batch]
    inputs = make_paged_batch(seq_lens, q_lens, 8, 2, head_dim, 16, dtype, gen)
    ref = reference_attention(*inputs, head_dim**-0.5)
    out = run_attention(inputs, head_dim**-0.5, max_query_len=8, max_seq_len=max(seq_lens))
    check_close(out, ref, dtype, "short extends")
    check_close(run_attention(inputs, head_dim**-0.5), ref, dtype, "short extends, hints computed")


def test_paged_attention_rejects_bad_shapes():
    q = torch.zeros(2, 8, 64, device=DEVICE, dtype=torch.float16)
    cache = torch.zeros(4, 16, 3, 64, device=DEVICE, dtype=torch.float16)  # 8 heads over 3 KV heads
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        ops.paged_attention(q, cache, cache, tables, lens, starts, 1.0)


# ----------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_cache(block_size, dtype):
    gen = generator("write", block_size, dtype)
    num_tokens, num_kv_heads, head_dim, num_blocks = (300 if ON_CUDA else 23), 4, 128, 40
    # key and value as strided views of one fused projection output, as the model produces them.
    kv = randn(num_tokens, 2 * num_kv_heads * head_dim + 64, dtype=dtype, gen=gen)
    key = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = kv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:5]] = -1  # padding tokens: skipped
    slots = slots.to(torch.int64 if block_size == 16 else torch.int32).to(DEVICE)
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, gen=gen)
    k_ref, v_ref = k_cache.clone().cpu(), v_cache.clone().cpu()
    reference.write_kv_cache(key.cpu(), value.cpu(), k_ref, v_ref, slots.cpu())
    ops.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.cpu(), k_ref) and torch.equal(v_cache.cpu(), v_ref)


# --------------------------------------------------------------------------------------------- norms
def assert_same_roundings(out: torch.Tensor, ref_same_dtype: torch.Tensor) -> None:
    """The kernel rounds where the reference run in the activation dtype rounds (HF numerics): equal up to
    rare 1-ulp flips from the GPU's approximate rsqrt/exp. The interpreter converts fp32 to bf16 by
    truncation (triton 3.9), not round-to-nearest as the GPU does, so bf16 is compared on CUDA only."""
    if out.dtype == torch.bfloat16 and not ON_CUDA:
        return
    equal = float((out.cpu() == ref_same_dtype.cpu()).float().mean())
    assert equal > 0.99, f"only {equal:.1%} of the elements equal the same-dtype reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("hidden", [96, 1000])
def test_rms_norm(hidden, dtype):
    gen = generator("rms", hidden, dtype)
    x = randn(37, hidden, dtype=dtype, gen=gen) * 3
    weight = randn(hidden, dtype=dtype, gen=gen)
    out = ops.rms_norm(x, weight, 1e-5)
    check_close(out, reference.rms_norm(x.float(), weight.float(), 1e-5), dtype, "rms_norm")
    # Same roundings as the reference in the activation dtype (HF numerics), up to rare 1-ulp flips.
    assert_same_roundings(out, reference.rms_norm(x, weight, 1e-5))


def test_rms_norm_on_strided_heads():
    """q/k norm (Qwen3): a [tokens, heads, head_dim] view of a fused qkv output, normalised per head."""
    dtype = torch.bfloat16
    gen = generator("rms-heads")
    qkv = randn(11, 12 * 64, dtype=dtype, gen=gen)
    q = qkv[:, : 8 * 64].view(11, 8, 64)
    weight = randn(64, dtype=dtype, gen=gen)
    out = ops.rms_norm(q, weight, 1e-6)
    check_close(out, reference.rms_norm(q.float(), weight.float(), 1e-6), dtype, "rms_norm on heads")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_fused_add_rms_norm(dtype):
    gen = generator("add-rms", dtype)
    x = randn(29, 520, dtype=dtype, gen=gen)
    residual = randn(29, 520, dtype=dtype, gen=gen) * 4
    weight = randn(520, dtype=dtype, gen=gen)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = ops.fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_residual = reference.fused_add_rms_norm(x.float(), residual.float(), weight.float(), 1e-6)
    check_close(out, ref_out, dtype, "normed")
    check_close(new_residual, ref_residual, dtype, "residual")
    same_dtype_out, same_dtype_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert_same_roundings(new_residual, same_dtype_residual)
    assert_same_roundings(out, same_dtype_out)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs must not change"


# The fused tensor-parallel all-reduce + residual add + RMSNorm, as one rank (the first or the last) of a
# simulated group whose peers have already pushed their partial sums into its buffer and signalled: the
# kernel's signal protocol, the rank-ordered sum and the norm, against fused_add_rms_norm(sum of partials,
# residual). The two-GPU run against NCCL is in test_peer_allreduce.py.
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3.2e-2)])
@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("last", [False, True], ids=["rank0", "last_rank"])
def test_tp_add_rms_norm_as_one_rank_of_a_simulated_group(world, dtype, tol, slot, last):
    rows, hidden = 5, 96  # hidden not a power of two: masked columns
    me = world - 1 if last else 0
    gen = generator("tp-add-rms", world, dtype, slot, me)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    partials = [rand(rows, hidden) for _ in range(world)]
    residual, weight = rand(rows, hidden), rand(hidden)
    region = rows * hidden + 7  # regions need not be row-aligned
    slot_numel = world * region
    max_rows = rows + 2
    buffers = [torch.full((2 * slot_numel,), float("nan"), dtype=dtype, device=DEVICE) for _ in range(world)]
    pads = [torch.zeros(2 * max_rows * world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    off, flag_off = slot * slot_numel, slot * max_rows * world
    peers = [r for r in range(world) if r != me]

    def region_of(buf, src):
        return buf[off + src * region:off + src * region + rows * hidden]

    for r in peers:  # peers have pushed their rows into this rank and flipped their flags in its pad
        region_of(buffers[me], r).copy_(partials[r].reshape(-1))
        for row in range(rows):
            pads[me][flag_off + row * world + r] = 1
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=DEVICE)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEVICE)
    residual_before = residual.clone()
    own_before = buffers[me].clone()

    out, new_residual = norm.tp_add_rms_norm(partials[me], residual, weight, 1e-5, ptrs, pad_ptrs, off, region,
                                             flag_off, me, world)

    summed = partials[0].float()  # rank order, as every rank sums
    for p in partials[1:]:
        summed = summed + p.float()
    want_out, want_res = reference.fused_add_rms_norm(summed.to(dtype), residual_before, weight, 1e-5)
    torch.testing.assert_close(new_residual.float(), want_res.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=tol, atol=tol)
    assert torch.equal(residual, residual_before)  # inputs untouched, like fused_add_rms_norm
    # It pushed its rows into its own region of this slot on every peer, and wrote nothing of its own.
    assert torch.equal(buffers[me].nan_to_num(7.0), own_before.nan_to_num(7.0))
    for r in peers:
        assert torch.equal(region_of(buffers[r], me), partials[me].reshape(-1))
        assert (~torch.isnan(buffers[r])).sum().item() == rows * hidden, "wrote outside its region of the slot"
    # It consumed every peer's signal (flags back to 0) and signalled every peer (its flag of this slot set).
    assert pads[me].sum().item() == 0
    for r in peers:
        flags = pads[r][flag_off:flag_off + rows * world].view(rows, world)
        assert flags[:, me].tolist() == [1] * rows and flags.sum().item() == rows
        assert pads[r].sum().item() == rows, "a flag outside this slot's was touched"


# The LL version (flag inside each 32-bit word), as one rank of a simulated group whose peers have already
# pushed this call's words: the epoch check, the unpacking, the rank-ordered sum and the norm, the words it
# pushed, and the epoch it keeps; from a fresh start and across the 16-bit wrap.
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("last", [False, True], ids=["rank0", "last_rank"])
@pytest.mark.parametrize("start_epoch", [0, 0xFFFF], ids=["fresh", "wrap"])
@pytest.mark.parametrize("row_words", [None, 104], ids=["packed", "strided"])
def test_tp_add_rms_norm_ll_as_one_rank_of_a_simulated_group(world, slot, last, start_epoch, row_words):
    rows, hidden, max_rows = 3, 100, 4  # hidden not a power of two: masked columns
    stride = row_words or hidden
    me = world - 1 if last else 0
    gen = generator("tp-add-rms-ll", world, slot, me, start_epoch, stride)
    dtype = torch.bfloat16

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    partials = [rand(rows, hidden) for _ in range(world)]
    residual, weight = rand(rows, hidden), rand(hidden)
    region = rows * stride + 4  # regions need not be row-aligned, only 16-byte aligned
    off = slot * world * region
    sentinel = 0x7EADBEEF
    buffers = [torch.full((2 * world * region,), sentinel, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    epochs = [torch.zeros(2 * max_rows, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    epochs[me][slot * max_rows:slot * max_rows + rows] = start_epoch
    epoch = (start_epoch + 1) & 0xFFFF

    def words(t, e=epoch):  # a call's words for a partial row: (epoch << 16) | the element's 16 bits
        bits = t.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
        return (e << 16) | bits if e < 0x8000 else ((e << 16) - (1 << 32)) | bits

    def row_of(buf, src, row):
        start = off + src * region + row * stride
        return buf[start:start + hidden]

    peers = [r for r in range(world) if r != me]
    for r in peers:
        for row in range(rows):
            row_of(buffers[me], r, row).copy_(words(partials[r][row]))
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=DEVICE)
    own_before = buffers[me].clone()
    out, new_residual = norm.tp_add_rms_norm_ll(partials[me], residual, weight, 1e-5, ptrs, epochs[me], off, region,
                                                slot * max_rows, me, world, row_words=row_words)

    summed = partials[0].float()
    for p in partials[1:]:
        summed = summed + p.float()
    want_out, want_res = reference.fused_add_rms_norm(summed.to(dtype), residual, weight, 1e-5)
    torch.testing.assert_close(new_residual.float(), want_res.float(), rtol=3.2e-2, atol=3.2e-2)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=3.2e-2, atol=3.2e-2)
    assert torch.equal(buffers[me], own_before)  # wrote nothing into its own buffer
    for r in peers:
        for row in range(rows):
            assert torch.equal(row_of(buffers[r], me, row), words(partials[me][row]))
        assert (buffers[r] != sentinel).sum().item() == rows * hidden, "wrote outside its rows of the slot"
    kept = epochs[me].tolist()
    assert kept[slot * max_rows:slot * max_rows + rows] == [epoch] * rows
    assert sum(kept) == epoch * rows, "an epoch outside this call's rows was touched"
    with pytest.raises(ValueError, match="do not fit"):
        norm.tp_add_rms_norm_ll(partials[me], residual, weight, 1e-5, ptrs, epochs[me], off, region, 0, me, world,
                                row_words=region)


@pytest.mark.skipif(ON_CUDA, reason="a second thread writes the peer's words while the interpreter spins")
def test_tp_add_rms_norm_ll_waits_for_this_calls_words():
    """Words still carrying the previous call's epoch are not taken: the kernel spins until they change."""
    import threading

    hidden, world, me = 64, 2, 0
    gen = generator("tp-add-rms-ll-wait")
    x, other = (torch.randn(1, hidden, generator=gen).to(torch.bfloat16) for _ in range(2))
    residual, weight = torch.zeros(1, hidden, dtype=torch.bfloat16), torch.ones(hidden, dtype=torch.bfloat16)
    bits = other.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    buffers = [torch.zeros(2 * world * hidden, dtype=torch.int32) for _ in range(world)]
    buffers[me][hidden:2 * hidden] = (5 << 16) | bits  # the peer's row from the previous call (epoch 5)
    epochs = torch.full((2,), 5, dtype=torch.int32)
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    result = {}

    def run():
        result["out"] = norm.tp_add_rms_norm_ll(x, residual, weight, 1e-5, ptrs, epochs, 0, hidden, 0, me, world)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(1.0)
    assert worker.is_alive(), "took words of the previous call"
    buffers[me][hidden:2 * hidden] = (6 << 16) | bits  # this call's words arrive
    worker.join(60)
    assert not worker.is_alive()
    want, _ = reference.fused_add_rms_norm((x.float() + other.float()).to(torch.bfloat16), residual, weight, 1e-5)
    torch.testing.assert_close(result["out"][0].float(), want.float(), rtol=3.2e-2, atol=3.2e-2)


def test_tp_add_rms_norm_ll_checks_input():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    ptrs, epochs = torch.zeros(2, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="16-bit"):
        norm.tp_add_rms_norm_ll(x.float(), x.float(), torch.ones(8), 1e-5, ptrs, epochs, 0, 64, 0, 0, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        norm.tp_add_rms_norm_ll(x, x, torch.ones(8, dtype=x.dtype), 1e-5, ptrs, epochs, 2, 64, 0, 0, 2)
    with pytest.raises(ValueError, match="do not fit"):
        norm.tp_add_rms_norm_ll(x, x, torch.ones(8, dtype=x.dtype), 1e-5, ptrs, epochs, 0, 12, 0, 0, 2)


def test_tp_add_rms_norm_checks_shapes():
    x = torch.zeros(2, 8)
    ptrs = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous x"):
        norm.tp_add_rms_norm(x.t(), x.t(), torch.ones(2), 1e-5, ptrs, ptrs, 0, 64, 0, 0, 2)
    with pytest.raises(ValueError, match="weight"):
        norm.tp_add_rms_norm(x, x, torch.ones(3), 1e-5, ptrs, ptrs, 0, 64, 0, 0, 2)
    with pytest.raises(ValueError, match="do not fit"):
        norm.tp_add_rms_norm(x, x, torch.ones(8), 1e-5, ptrs, ptrs, 0, 15, 0, 0, 2)


# ---------------------------------------------------------------------------------------------- gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize(("block_n", "block_k"), [(4, 512), (8, 256), (16, 64)])
def test_gemv(dtype, block_n, block_k):
    gen = generator("gemv", dtype, block_n, block_k)
    k, n = 700, 37  # neither a multiple of the tiles: masked rows and columns
    x = randn(1, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, gen=gen)
    out = gemv.gemv(x, w, block_n=block_n, block_k=block_k)
    check_close(out, x.float() @ w.float().T, dtype, "gemv")
    with pytest.raises(ValueError, match="one row"):
        gemv.gemv(randn(2, k, dtype=dtype, gen=gen), w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize(("block_k", "pre_k"), [(256, 512), (512, 1024), (64, 64)])
def test_gemv_wide_first_tile(dtype, block_k, pre_k):
    """A first tile wider than the loop's (``pre_k`` columns, loaded before the PDL wait), alone (K <= pre_k)
    or followed by the loop, against the fp32 product."""
    gen = generator("gemv_pre_k", dtype, block_k, pre_k)
    k, n = 700, 37
    x = randn(1, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, gen=gen)
    check_close(gemv.gemv(x, w, block_k=block_k, pre_k=pre_k), x.float() @ w.float().T, dtype, "gemv pre_k")
    for bad in (768, 0, 128):
        with pytest.raises(ValueError, match="multiple of block_k"):
            gemv.gemv(x, w, block_k=256, pre_k=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
def test_argmax_matches_torch(dtype):
    """Greedy sampling's argmax against torch's on the same logits: a vocabulary that is not a multiple of the
    split, the maximum repeated within a split and across splits (the first wins), an all -inf row, and a
    single split."""
    gen = generator("argmax", dtype)
    rows, vocab, block = 5, 1000, 128
    logits = randn(rows, vocab, dtype=dtype, gen=gen)
    logits[1, [300, 301, 900]] = 50.0  # ties within a split and across splits
    logits[2, :] = float("-inf")
    logits[3, vocab - 1] = 60.0  # in the last, partial split
    logits[4, [5, 700]] = 70.0
    got = pointwise.argmax(logits, block=block)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), logits.float().argmax(dim=-1).cpu())
    assert torch.equal(pointwise.argmax(logits[:, :100], block=128).cpu(), logits[:, :100].argmax(dim=-1).cpu())
    with pytest.raises(ValueError, match="float logits"):
        pointwise.argmax(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize(("block_n", "n"), [(2, 38), (4, 38), (8, 64)])
def test_gemv_silu_epilogue(dtype, block_n, n):
    """The GEMV with silu(gate) * up in its epilogue (gate, up rows alternating): the same bits as the GEMV
    followed by the interleaved silu_and_mul kernel, and close to the fp32 reference; N not a multiple of the
    tile (a masked pair)."""
    gen = generator("gemv_silu", dtype, block_n, n)
    k = 300
    x = randn(1, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, gen=gen)
    fused = gemv.gemv(x, w, block_n=block_n, block_k=128, silu=True)
    assert fused.shape == (1, n // 2)
    separate = pointwise.silu_and_mul(gemv.gemv(x, w, block_n=block_n, block_k=128), interleaved=True)
    assert torch.equal(fused, separate)
    # Against fp32 throughout: three roundings to the dtype (the product, the SiLU, the output) where the
    # other kernels' tests have one or two, so three times their tolerance.
    want = reference.silu_and_mul(x.float() @ w.float().T, interleaved=True)
    err = rel_err(fused, want)
    assert err < 3 * TOL[dtype], f"gemv silu: relative error {err:.2e}"
    with pytest.raises(ValueError, match="even"):
        gemv.gemv(x, w, block_n=3, silu=True)


def test_gemv_launch_spec_and_table(tmp_path, monkeypatch):
    """PAGEDSERVE_GEMV_CONFIG / PAGEDSERVE_GEMV_TABLE spellings: parsed, rejected with the expected form, and a
    table entry wins over the K limit and the default."""
    kernels = importlib.import_module("pagedserve.kernels")
    assert kernels.parse_gemv_spec("2x1024w8") == dict(block_n=2, block_k=1024, num_warps=8, num_stages=3)
    assert kernels.parse_gemv_spec("1x2048")["num_warps"] == 4
    with pytest.raises(ValueError, match="BLOCK_NxBLOCK_K"):
        kernels.parse_gemv_spec("2by1024")
    path = tmp_path / "table.json"
    path.write_text('{"4096,20000": "1x512w8", "4096,4096": "cublas"}')
    monkeypatch.setattr(kernels, "_GEMV_TABLE", kernels._load_gemv_table(str(path)))
    monkeypatch.setattr(kernels, "_GEMV_SPEC", None)  # whatever PAGEDSERVE_GEMV_CONFIG says here
    assert kernels._gemv_launch(4096, 20000)["num_warps"] == 8  # above GEMV_MAX_K, routed by the table
    assert kernels._gemv_launch(4096, 4096) is None  # cuBLAS by the table
    assert kernels._gemv_launch(3072, 4096) == kernels.parse_gemv_spec(kernels.GEMV_TUNED[(3072, 4096)])
    assert kernels._gemv_launch(4096, 40000) is None  # untuned and above the limit: cuBLAS
    assert kernels._gemv_launch(128256, 4096)["block_k"] == 2048  # an untuned wide output (an LM head)


# -------------------------------------------------------------------------------------- rotary, silu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding(head_dim, dtype):
    gen = generator("rope", head_dim, dtype)
    num_tokens, num_q_heads, num_k_heads, max_pos = 13, 8, 2, 4096
    qkv = randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_k_heads) * head_dim].view(
        num_tokens, num_k_heads, head_dim
    )
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    q_before = q.clone()
    q_out, k_out = ops.rotary_embedding(positions, q, k, cos_sin)
    q_ref, k_ref = reference.rotary_embedding(positions.cpu(), q.float().cpu(), k.float().cpu(), cos_sin.cpu())
    check_close(q_out, q_ref, dtype, "q")
    check_close(k_out, k_ref, dtype, "k")
    q_same, k_same = reference.rotary_embedding(positions, q, k, cos_sin)
    assert_same_roundings(q_out, q_same)
    assert_same_roundings(k_out, k_same)
    assert torch.equal(q, q_before), "rotary_embedding must not modify its inputs"


def _rope_cache(head_dim: int, max_pos: int = 4096) -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_rotary_embedding_paired_layout(head_dim, dtype):
    """Heads stored as pairs (PAGEDSERVE_FUSED_ROTARY): the kernel in that layout gives the rotate-half result
    in that layout bit for bit, and attention scores q . k are those of the usual layout (fp32)."""
    gen = generator("rope-paired", head_dim, dtype)
    num_tokens, num_q_heads, num_k_heads = 9, 4, 2
    q = randn(num_tokens, num_q_heads, head_dim, dtype=dtype, gen=gen)
    k = randn(num_tokens, num_k_heads, head_dim, dtype=dtype, gen=gen)
    cos_sin = _rope_cache(head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    q_out, k_out = ops.rotary_embedding(positions, q, k, cos_sin)
    qp_out, kp_out = ops.rotary_embedding(positions, reference.pair_heads(q), reference.pair_heads(k), cos_sin,
                                          paired=True)
    assert torch.equal(qp_out.cpu(), reference.pair_heads(q_out).cpu())
    assert torch.equal(kp_out.cpu(), reference.pair_heads(k_out).cpu())
    assert torch.equal(reference.unpair_heads(reference.pair_heads(q)), q)
    qf, kf = reference.rotary_embedding(positions.cpu(), q.float().cpu(), k.float().cpu(), cos_sin.cpu())
    qpf, kpf = reference.rotary_embedding(positions.cpu(), reference.pair_heads(q.float().cpu()),
                                          reference.pair_heads(k.float().cpu()), cos_sin.cpu(), paired=True)
    scores = torch.einsum("tqd,tkd->tqk", qf, kf)
    torch.testing.assert_close(torch.einsum("tqd,tkd->tqk", qpf, kpf), scores, rtol=1e-5, atol=1e-4)
    # the cache variant: the same q, and k / v written in the paired layout
    k_cache = torch.full((4, 16, num_k_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    slots = torch.arange(num_tokens, device=DEVICE) * 3
    v = randn(num_tokens, num_k_heads, head_dim, dtype=dtype, gen=gen)
    q_c = ops.rotary_embedding_and_cache(positions, reference.pair_heads(q), reference.pair_heads(k), v, cos_sin,
                                         k_cache, v_cache, slots, paired=True)
    assert torch.equal(q_c.cpu(), qp_out.cpu())
    assert torch.equal(k_cache.view(-1, num_k_heads, head_dim)[slots].cpu(), kp_out.cpu())
    assert torch.equal(v_cache.view(-1, num_k_heads, head_dim)[slots].cpu(), v.cpu())


@pytest.mark.parametrize(("block_n", "head_dim", "kv_heads"), [(2, 64, 2), (4, 64, 1), (2, 16, 2)])
@pytest.mark.parametrize("slot", [37, -1], ids=["slot", "no_slot"])
def test_gemv_qkv_rotary_epilogue(block_n, head_dim, kv_heads, slot):
    """One token's q|k|v GEMV that rotates q and k (paired heads) and writes K/V into the cache in its epilogue,
    against the fp32 product followed by the reference's rotary + cache write; a negative slot writes nothing
    (the cache stays poisoned) and everything but the slot stays poisoned."""
    dtype = torch.bfloat16
    gen = generator("gemv-qkv-rotary", block_n, head_dim, kv_heads, slot)
    q_heads, hidden, block_size = 4, 96, 16
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    x = randn(1, hidden, dtype=dtype, gen=gen)
    w = randn(q_size + 2 * kv_size, hidden, dtype=dtype, gen=gen) * 0.2
    cos_sin = _rope_cache(head_dim)
    positions = torch.tensor([1234], device=DEVICE)
    slots = torch.tensor([slot], device=DEVICE)
    k_cache = torch.full((4, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    q = gemv.gemv_qkv_rotary(x, w, positions, cos_sin, k_cache, v_cache, slots, q_size, kv_size, head_dim,
                             block_n=block_n, block_k=64)
    # Against the separate kernels (GEMV, then the paired rotary + cache write): the same roundings.
    k_two = torch.full_like(k_cache, float("nan"))
    v_two = k_two.clone()
    y = gemv.gemv(x, w, block_n=block_n, block_k=64)
    qs, ks, vs = (t.reshape(1, -1, head_dim) for t in y.split([q_size, kv_size, kv_size], dim=-1))
    q_two = ops.rotary_embedding_and_cache(positions, qs, ks, vs, cos_sin, k_two, v_two, slots, paired=True)
    check_close(q.view(1, q_heads, head_dim), q_two, dtype, "q vs separate kernels")
    # And against fp32 throughout (three roundings to the dtype on the way: three times the tolerance).
    yf = (x.float() @ w.float().T).cpu()
    qr, kr, vr = (t.reshape(1, -1, head_dim) for t in yf.split([q_size, kv_size, kv_size], dim=-1))
    k_ref = torch.zeros(4, block_size, kv_heads, head_dim)
    v_ref = torch.zeros_like(k_ref)
    q_ref = reference.rotary_embedding_and_cache(positions.cpu(), qr, kr, vr, cos_sin.cpu(), k_ref, v_ref,
                                                 slots.cpu(), paired=True)
    assert rel_err(q.view(1, q_heads, head_dim), q_ref) < 3 * TOL[dtype]
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim).cpu(), v_cache.view(-1, kv_heads, head_dim).cpu()
    others = torch.ones(flat_k.shape[0], dtype=torch.bool)
    if slot >= 0:
        check_close(flat_k[slot], k_two.view(-1, kv_heads, head_dim)[slot], dtype, "k vs separate kernels")
        check_close(flat_v[slot], v_two.view(-1, kv_heads, head_dim)[slot], dtype, "v vs separate kernels")
        assert rel_err(flat_k[slot], k_ref.view(-1, kv_heads, head_dim)[slot]) < 3 * TOL[dtype]
        assert rel_err(flat_v[slot], v_ref.view(-1, kv_heads, head_dim)[slot]) < 3 * TOL[dtype]
        others[slot] = False
    assert torch.isnan(flat_k[others]).all() and torch.isnan(flat_v[others]).all(), "wrote outside the slot"
    with pytest.raises(ValueError, match="even"):
        gemv.gemv_qkv_rotary(x, w, positions, cos_sin, k_cache, v_cache, slots, q_size, kv_size, head_dim,
                             block_n=3)


@pytest.mark.parametrize(("head_dim", "block_size"), [(64, 16), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_rotary_embedding_and_cache_equals_rotary_then_write(head_dim, block_size, dtype):
    """The fused kernel (one launch per layer) gives bit for bit what the two kernels give: the rotated q,
    and caches holding the rotated k and v at each slot, untouched at negative slots and elsewhere."""
    gen = generator("rope-cache", head_dim, block_size, dtype)
    num_tokens, num_q_heads, num_k_heads, max_pos, num_blocks = 21, 8, 2, 4096, 12
    qkv = randn(num_tokens, (num_q_heads + 2 * num_k_heads) * head_dim, dtype=dtype, gen=gen)
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_k_heads) * head_dim].view(num_tokens, num_k_heads, head_dim)
    v = qkv[:, (num_q_heads + num_k_heads) * head_dim :].view(num_tokens, num_k_heads, head_dim)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:4]] = -1
    slots = slots.to(DEVICE)
    k_cache = randn(num_blocks, block_size, num_k_heads, head_dim, dtype=dtype, gen=gen)
    v_cache = randn(num_blocks, block_size, num_k_heads, head_dim, dtype=dtype, gen=gen)
    k_two, v_two = k_cache.clone(), v_cache.clone()
    q_two, k_rot = ops.rotary_embedding(positions, q, k, cos_sin)
    ops.write_kv_cache(k_rot, v, k_two, v_two, slots)
    q_one = ops.rotary_embedding_and_cache(positions, q, k, v, cos_sin, k_cache, v_cache, slots)
    assert torch.equal(q_one.cpu(), q_two.cpu())
    assert torch.equal(k_cache.cpu(), k_two.cpu()) and torch.equal(v_cache.cpu(), v_two.cpu())
    # And the reference's composition (fp32) agrees within the dtype's tolerance.
    k_ref, v_ref = k_cache.float().cpu().clone(), v_cache.float().cpu().clone()
    q_ref = reference.rotary_embedding_and_cache(positions.cpu(), q.float().cpu(), k.float().cpu(), v.float().cpu(),
                                                 cos_sin.cpu(), k_ref, v_ref, slots.cpu())
    check_close(q_one, q_ref, dtype, "q")
    check_close(k_cache, k_ref, dtype, "k_cache")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_silu_and_mul(dtype):
    gen = generator("silu", dtype)
    x = randn(3, 7, 2 * 1100, dtype=dtype, gen=gen) * 3
    out = ops.silu_and_mul(x)
    check_close(out, reference.silu_and_mul(x.float()), dtype, "silu_and_mul")
    assert_same_roundings(out, reference.silu_and_mul(x))
    # gate, up alternating (the layout PAGEDSERVE_FUSED_SILU loads): the same values from the other columns
    out = ops.silu_and_mul(x, interleaved=True)
    check_close(out, reference.silu_and_mul(x.float(), interleaved=True), dtype, "silu_and_mul interleaved")
    assert_same_roundings(out, reference.silu_and_mul(x, interleaved=True))
    gate_then_up = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    assert torch.equal(reference.silu_and_mul(x, interleaved=True), reference.silu_and_mul(gate_then_up))


# ----------------------------------------------------------------------- programmatic dependent launch
@pytest.mark.skipif(not ON_CUDA, reason="programmatic dependent launch needs a GPU")
def test_pdl_chain_in_a_cuda_graph_equals_plain_launches():
    """Batch-1 decode layers made of our kernels, each reading what the one before wrote, launched with PDL
    and captured in a CUDA graph, give the same bits as plain eager launches for fresh inputs on every replay.
    A kernel that read its input (or wrote its output) before its wait would see the previous replay's values
    in the graph's buffers; the step's KV-cache slot is poisoned before each replay, so attention reading the
    cache before the rotary kernel wrote this step's K/V would give NaN."""
    if not pdl.enabled(DEVICE):
        pytest.skip("PDL is not available on this GPU (needs compute capability 9.0 and triton's gdc ops)")
    gen = generator("pdl-chain")
    dtype, hidden, heads, kv_heads, head_dim, inter, layers = torch.bfloat16, 1024, 8, 2, 128, 2816, 6
    block_size, seq_len, eps = 16, 300, 1e-5
    scale = 0.05

    def w(*shape):
        return randn(*shape, dtype=dtype, gen=gen) * shape[-1] ** -0.5

    params = [dict(n1=1 + w(hidden) * 0.1, qkv=w((heads + 2 * kv_heads) * head_dim, hidden),
                   o=w(hidden, heads * head_dim), n2=1 + w(hidden) * 0.1, gu=w(2 * inter, hidden),
                   down=w(hidden, inter)) for _ in range(layers)]
    num_blocks = -(-seq_len // block_size) + 3
    caches = [(randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, gen=gen),
               randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, gen=gen)) for _ in range(layers)]
    as_int = dict(dtype=torch.int32, device=DEVICE)
    block_table = torch.randperm(num_blocks, generator=gen)[: -(-seq_len // block_size)].to(**as_int)[None]
    seq_lens = torch.tensor([seq_len], **as_int)
    query_start_loc = torch.tensor([0, 1], **as_int)
    positions = torch.tensor([seq_len - 1], dtype=torch.int64, device=DEVICE)
    page = int(block_table[0, (seq_len - 1) // block_size])
    slot_mapping = torch.tensor([page * block_size + (seq_len - 1) % block_size], dtype=torch.int64, device=DEVICE)
    cos_sin = torch.randn(seq_len, head_dim, generator=gen).to(DEVICE)

    def forward(x, residual):
        for p, (k_cache, v_cache) in zip(params, caches, strict=True):
            h, residual = norm.fused_add_rms_norm(x, residual, p["n1"], eps)
            qkv = gemv.gemv(h, p["qkv"])
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q = pointwise.rotary_embedding_and_cache(
                positions, q.reshape(1, heads, head_dim), k.reshape(1, kv_heads, head_dim),
                v.reshape(1, kv_heads, head_dim), cos_sin, k_cache, v_cache, slot_mapping)
            a = attention.paged_attention(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale,
                                          max_query_len=1, max_seq_len=seq_len)
            o = gemv.gemv(a.reshape(1, -1), p["o"], pre_k=1024)  # the whole row loaded before the PDL wait
            h, residual = norm.fused_add_rms_norm(o, residual, p["n2"], eps)
            x = gemv.gemv(ops.silu_and_mul(gemv.gemv(h, p["gu"])), p["down"])
        return x, residual

    static_x = randn(1, hidden, dtype=dtype, gen=gen)
    static_res = randn(1, hidden, dtype=dtype, gen=gen)
    try:
        pdl.set_enabled(True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward(static_x, static_res)  # compiles the PDL variants outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = forward(static_x, static_res)
        for trial in range(5):
            static_x.copy_(randn(1, hidden, dtype=dtype, gen=gen))
            static_res.copy_(randn(1, hidden, dtype=dtype, gen=gen))
            pdl.set_enabled(False)
            want = [t.clone() for t in forward(static_x, static_res)]
            pdl.set_enabled(True)
            eager = forward(static_x, static_res)
            for k_cache, v_cache in caches:  # the replay's rotary kernel must write these before attention reads
                k_cache.view(-1, kv_heads, head_dim)[int(slot_mapping)].fill_(float("nan"))
                v_cache.view(-1, kv_heads, head_dim)[int(slot_mapping)].fill_(float("nan"))
            graph.replay()
            for name, got_graph, got_eager, ref in zip(("x", "residual"), graph_out, eager, want, strict=True):
                assert torch.equal(got_eager, ref), f"trial {trial}: eager PDL launches changed {name}"
                assert torch.equal(got_graph, ref), f"trial {trial}: the PDL graph changed {name}"
        torch.cuda.synchronize()
    finally:
        pdl.set_enabled(None)


@pytest.mark.skipif(not ON_CUDA, reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("launch", [dict(), dict(dec_early=False), dict(pdl=False)], ids=["early", "late", "off"])
def test_decode_attention_after_a_pdl_kv_write_in_a_cuda_graph(launch):
    """Each PAGEDSERVE_ATTN_PDL mode of decode attention (several splits, so the merge runs too), captured in a
    CUDA graph right after the PDL kernel that writes this step's K/V into the cache, gives the same bits as
    plain eager launches on every replay with fresh K/V: a decode kernel that read the cache before the write
    finished would see the poisoned (NaN) slots. (The write is a short kernel, so a missing wait is caught only
    when the race is lost; an output the graph did not write is always caught.)"""
    if not pdl.enabled(DEVICE):
        pytest.skip("PDL is not available on this GPU (needs compute capability 9.0 and triton's gdc ops)")
    gen = generator(f"attn-pdl-{sorted(launch)}")
    dtype, heads, kv_heads, head_dim, block_size, scale = torch.bfloat16, 16, 4, 128, 16, 0.08
    seq_lens = [300, 1000, 77, 2049]
    q, k_cache, v_cache, block_tables, lens, starts = make_paged_batch(
        seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, block_size, dtype, gen)
    last = torch.tensor([s - 1 for s in seq_lens], device=DEVICE)
    slots = (block_tables[torch.arange(len(seq_lens), device=DEVICE), last // block_size].long() * block_size
             + last % block_size)
    key = randn(len(seq_lens), kv_heads, head_dim, dtype=dtype, gen=gen)
    value = randn(len(seq_lens), kv_heads, head_dim, dtype=dtype, gen=gen)
    out = torch.empty_like(q)

    def step(**kw):
        pointwise.write_kv_cache(key, value, k_cache, v_cache, slots)
        return attention.paged_attention_launch(q, k_cache, v_cache, block_tables, lens, starts, scale, out=out,
                                                max_query_len=1, max_seq_len=max(seq_lens), decode_partition=256,
                                                **kw)

    try:
        pdl.set_enabled(True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(**launch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(**launch)
        for trial in range(5):
            key.copy_(randn(*key.shape, dtype=dtype, gen=gen))
            value.copy_(randn(*value.shape, dtype=dtype, gen=gen))
            pdl.set_enabled(False)
            want = step(pdl=False).clone()
            for cache in (k_cache, v_cache):
                cache.view(-1, kv_heads, head_dim)[slots] = float("nan")
            out.fill_(float("nan"))  # the graph writes the same buffer the eager reference did
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want), f"trial {trial}: decode attention ({launch}) in the graph changed"
    finally:
        pdl.set_enabled(None)


def test_dispatch_uses_triton_on_cuda_and_reference_elsewhere():
    from pagedserve import kernels

    x = torch.ones(2, 8, device=DEVICE, dtype=torch.float16)
    assert kernels.use_triton(x) == ON_CUDA
    if not ON_CUDA:
        assert os.environ.get("TRITON_INTERPRET") == "1"


if RERUN_IN_SUBPROCESS:
    for _name in [name for name in globals() if name.startswith("test_")]:
        del globals()[_name]

    def test_kernels_in_a_fresh_interpreter_process():
        """Triton was imported before TRITON_INTERPRET could be set: run this file in a child process."""
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
            env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
