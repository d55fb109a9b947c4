"""One tensor-parallel rank: what every rank does to join the group and build its shard, and the loop that
ranks 1..N-1 run in their own processes.

Rank 0 is the engine process itself (see :mod:`pagedserve.runtime.distributed`): it runs the scheduler and
sends each step's ``SchedulerOutput`` down a pipe to every other rank, which executes it on its own shard of
the weights and its own slice of the KV cache. Only rank 0 samples; with async scheduling it broadcasts the
sampled ids on the device, and the workers fill the next step's placeholder inputs from them. The model's
collectives keep the ranks' GPUs in lock step, while a worker's host may run a step ahead of its GPU; the
workers send nothing back unless they fail.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedserve.runtime.config import CacheConfig, SchedulerConfig
from pagedserve.runtime.model_runner import ModelRunner
from pagedserve.runtime.parallel import TPGroup, make_peer_all_reduce

STORE_HOST = "127.0.0.1"
# A path prefix: each worker writes its host timeline (per step: waiting, received, executed) to PREFIX.rankN.json
# at shutdown. For profiling (bench/profile_tp.py); off by default.
TRACE_ENV = "PAGEDSERVE_TP_TRACE"
SHUTDOWN = b""  # the message that stops a worker (a pickled step is never empty)
# How the engine starts a worker: ``python -c WORKER_BOOT FD SYS_PATH``. Not multiprocessing's spawn, which
# re-runs the user's main script in the child; and the parent's sys.path is handed over so the worker imports
# pagedserve from wherever the engine did (an editable install, PYTHONPATH, or a path added at run time).
WORKER_BOOT = (
    "import json, sys; sys.path[:0] = json.loads(sys.argv[2]); "
    "from multiprocessing.connection import Connection; "
    "from pagedserve.runtime.worker import worker_main; worker_main(Connection(int(sys.argv[1])))"
)


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build its shard; the same for every rank, picklable."""

    model: str
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"; rank r uses cuda:r
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    seed: int
    capture_cuda_graphs: bool
    size: int
    store_port: int
    setup_timeout_s: float
    step_timeout_s: float
    spec_query_len: int | None = None  # speculative decoding: also capture graphs of k + 1 query tokens

    @property
    def backend(self) -> str:
        return "nccl" if self.device_type == "cuda" else "gloo"

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")


def init_rank(spec: RankSpec, rank: int, store: dist.Store) -> TPGroup:
    """Join the process group. The default group (long timeout) serves start-up; the model's collectives
    run on a group of their own whose timeout is short, so a hung rank surfaces as an error quickly."""
    kwargs = {}
    if spec.device_type == "cuda":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = spec.device(rank)
    dist.init_process_group(
        spec.backend, store=store, rank=rank, world_size=spec.size,
        timeout=datetime.timedelta(seconds=spec.setup_timeout_s), **kwargs,
    )
    step_group = dist.new_group(
        list(range(spec.size)), timeout=datetime.timedelta(seconds=spec.step_timeout_s + 5)
    )
    peer = make_peer_all_reduce(step_group, spec.device(rank), spec.dtype)
    return TPGroup(rank, spec.size, step_group, peer)


def build_runner(spec: RankSpec, tp: TPGroup, hf_config, weights) -> ModelRunner:
    """This rank's model (its shard only: each parameter's weight_loader copies its slice as it streams by)."""
    return ModelRunner(
        hf_config, weights, spec.dtype, spec.device(tp.rank), spec.cache_config, spec.scheduler_config,
        tp=tp, seed=spec.seed,
    )


def agree_num_blocks(runner: ModelRunner) -> int:
    """Each rank's KV capacity in blocks, reduced to the smallest: every rank must hold every block id."""
    local = torch.tensor([runner.determine_num_blocks()], dtype=torch.int64, device=runner.device)
    dist.all_reduce(local, op=dist.ReduceOp.MIN)
    return int(local.item())


def exit_with_parent(poll_s: float = 0.5) -> None:
    """Leave no orphan: exit as soon as the engine process is gone, even when it was SIGKILLed.

    (PR_SET_PDEATHSIG would fire when the *thread* that started us ends, and the server builds its engine
    in a short-lived thread, so we watch the parent pid instead.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(conn) -> None:
    """Entry point of a worker process: its RankSpec and rank arrive first on ``conn``."""
    exit_with_parent()
    spec, rank = conn.recv()
    torch.set_num_threads(1)  # ranks share the host's cores; one thread each keeps them from fighting
    try:
        from pagedserve.runtime.loader import load_model_source

        store = dist.TCPStore(
            STORE_HOST, spec.store_port, spec.size, is_master=False,
            timeout=datetime.timedelta(seconds=spec.setup_timeout_s),
        )
        tp = init_rank(spec, rank, store)
        source = load_model_source(spec.model)
        runner = build_runner(spec, tp, source.config, source.iter_weights())
        runner.allocate_kv_cache(agree_num_blocks(runner))
        if spec.capture_cuda_graphs:
            runner.capture_cuda_graphs(spec.spec_query_len)
        trace_path = os.environ.get(TRACE_ENV)
        trace: list[tuple[float, float, float]] | None = [] if trace_path else None
        while True:
            t_wait = time.perf_counter() if trace is not None else 0.0
            try:
                msg = conn.recv_bytes()
            except EOFError:  # the engine closed its end without a word: it is gone
                break
            if msg == SHUTDOWN:
                if spec.device_type == "cuda":  # rank 0 drained its queue first; let ours finish the same steps
                    torch.cuda.synchronize()
                break
            t_recv = time.perf_counter() if trace is not None else 0.0
            so, deferred = pickle.loads(msg)
            runner.execute(so, deferred=deferred)
            if trace is not None:
                trace.append((t_wait, t_recv, time.perf_counter()))
        if trace:
            with open(f"{trace_path}.rank{rank}.json", "w") as f:
                json.dump({"columns": ["wait_start", "received", "executed"], "steps": trace}, f)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which names it in its error
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
        os._exit(1)
    leave_process_group()


def leave_process_group() -> None:
    """Leave the tensor-parallel group at shutdown. NCCL communicators are aborted, not destroyed: a
    destroy can wait on peers that have already exited (measured: rank 0's timed out after 10 s on two H200s)
    and abort returns at once; gloo groups are destroyed."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
            return
        except Exception:  # noqa: BLE001 - an older torch without it: destroy below
            pass
    dist.destroy_process_group()
