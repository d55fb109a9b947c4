"""Host-side costs a tensor-parallel decode step adds on top of TP=1, measured on the CPU alone (no GPU):

- rank 0 pickling the step's SchedulerOutput (what ``TensorParallelRunner.execute`` sends every step),
- the trip to a worker process over the same kind of socket and its unpickling there, answered at once
  (a round trip: twice the one-way latency a worker sees before it can prepare its inputs),
- handing rank 0's part to its own thread and getting the result back (``_Rank0Thread``),
- the message the engine process sends the server after every step (that step's
  RequestUpdates and the engine's statistics), pickled, sent and unpickled the same way.

    python3 bench/bench_tp_host.py --out bench/results/tp_host_cpu.json

A step of a small batch at TP=2 on two H200s takes ~3 ms; these costs matter if they approach that, or if they
sit between a worker receiving its step and launching it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

import numpy as np

from pagedserve.runtime.async_engine import EngineStats
from pagedserve.runtime.distributed import _Rank0Thread
from pagedserve.runtime.engine_process import pack_update
from pagedserve.runtime.scheduler import RequestUpdate, SchedulerOutput

CHILD = r"""
import pickle, sys, time
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
while True:
    data = conn.recv_bytes()
    if data == b"stop":
        break
    t0 = time.perf_counter()
    pickle.loads(data)
    conn.send_bytes(str(time.perf_counter() - t0).encode())
"""


def decode_step(batch: int, step: int) -> SchedulerOutput:
    """A decode step of ``batch`` running requests of ~600 tokens (one new block every 16 steps)."""
    return SchedulerOutput(
        req_ids=[f"req-{i:06d}" for i in range(batch)], num_scheduled_tokens=[1] * batch,
        num_computed_tokens=[600 + step] * batch, token_ids=[[1000 + i] for i in range(batch)],
        new_block_ids=[[50_000 + i] if (i + step) % 16 == 0 else [] for i in range(batch)],
        do_sample=[True] * batch, total_num_scheduled_tokens=batch,
    )


def step_message(batch: int, step: int) -> tuple:
    """What the engine process sends the server after a decode step of ``batch`` requests (engine_process.py)."""
    updates = [RequestUpdate(f"cmpl-{i:032x}", [1000 + i + step]) for i in range(batch)]
    return ("step", [pack_update(u) for u in updates], 0.012, [],
            EngineStats(batch, 0, 50000, 20000, 0.6, 10**6, 10**5, 0, 0, step))


def median_us(samples) -> float:
    return float(np.median(samples) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()

    ours, theirs = socket.socketpair()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    theirs.close()
    conn = Connection(ours.detach())
    thread = _Rank0Thread()
    rows = []
    try:
        for batch in (1, 16, 64, 256):
            dumps, trips, loads = [], [], []
            for i in range(args.iters):
                so = decode_step(batch, i)
                t0 = time.perf_counter()
                payload = pickle.dumps((so, True), protocol=pickle.HIGHEST_PROTOCOL)
                t1 = time.perf_counter()
                conn.send_bytes(payload)
                child_loads = float(conn.recv_bytes())
                t2 = time.perf_counter()
                dumps.append(t1 - t0)
                trips.append(t2 - t1)
                loads.append(child_loads)
            msg_dumps, msg_trips, msg_loads, rebuilds = [], [], [], []
            for i in range(args.iters):
                step_msg = step_message(batch, i)
                t0 = time.perf_counter()
                msg = pickle.dumps(step_msg, protocol=pickle.HIGHEST_PROTOCOL)
                t1 = time.perf_counter()
                conn.send_bytes(msg)
                msg_loads.append(float(conn.recv_bytes()))
                msg_trips.append(time.perf_counter() - t1)
                msg_dumps.append(t1 - t0)
                t2 = time.perf_counter()
                [RequestUpdate(*t) for t in step_msg[1]]  # what the server does with the unpickled message
                rebuilds.append(time.perf_counter() - t2)
            handoffs = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                thread.submit(int).result()
                handoffs.append(time.perf_counter() - t0)
            row = {"batch": batch, "payload_bytes": len(payload), "pickle_us": median_us(dumps),
                   "round_trip_to_worker_us": median_us(trips), "worker_unpickle_us": median_us(loads),
                   "rank0_thread_handoff_us": median_us(handoffs),
                   "engine_step_message_bytes": len(msg), "engine_step_message_pickle_us": median_us(msg_dumps),
                   "engine_step_message_round_trip_us": median_us(msg_trips),
                   "engine_step_message_unpickle_us": median_us(msg_loads),
                   "engine_step_message_rebuild_us": median_us(rebuilds)}
            rows.append(row)
            print(row, flush=True)
    finally:
        conn.send_bytes(b"stop")
        child.wait(10)
        thread.stop()
    result = {"command": " ".join(["python3"] + sys.argv), "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "rows": rows}
    print("\n| batch | payload | pickle | round trip to a worker (incl. its unpickle) | unpickle | rank-0 thread "
          "hand-off |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['payload_bytes']} B | {r['pickle_us']:.1f} us | {r['round_trip_to_worker_us']:.1f} "
              f"us | {r['worker_unpickle_us']:.1f} us | {r['rank0_thread_handoff_us']:.1f} us |")
    print("\n| batch | engine process -> server step message | pickle | round trip (incl. unpickle) | unpickle | "
          "rebuild RequestUpdates |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['engine_step_message_bytes']} B | {r['engine_step_message_pickle_us']:.1f} us | "
              f"{r['engine_step_message_round_trip_us']:.1f} us | {r['engine_step_message_unpickle_us']:.1f} us | "
              f"{r['engine_step_message_rebuild_us']:.1f} us |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
