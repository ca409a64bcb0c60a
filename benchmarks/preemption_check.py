"""What the trainer's per-call stop check costs: JAX's pre-emption sync point, asked once per
call of the train step on every process of a multi-process run (trainer._StopRequest), and the
single-process flag read.

    python benchmarks/preemption_check.py --calls 2000

Starts JAX's distributed runtime as one process with a coordinator on 127.0.0.1 (the same
service a pod uses, so `reached_preemption_sync_point` does its real work), times `--calls`
consecutive calls, and prints microseconds per call. Compare with the train step's time
(BENCHMARKS.md: hundreds of milliseconds per step for the CPU test network, tens of
milliseconds for the paper networks on an H100).
"""

import argparse
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from cm_jax import distributed

    distributed.initialize(f"127.0.0.1:{_free_port()}", 1, 0, timeout_s=60)
    start = time.perf_counter()
    for call in range(1, args.calls + 1):
        if distributed.reached_preemption_sync_point(call):
            raise SystemExit("a pre-emption notice arrived during the measurement")
    sync_us = (time.perf_counter() - start) / args.calls * 1e6

    from cm_jax import trainer

    stop_requested = trainer._StopRequest(first_call=0)  # One process: a Python flag.
    start = time.perf_counter()
    for _ in range(args.calls):
        stop_requested()
    flag_us = (time.perf_counter() - start) / args.calls * 1e6
    stop_requested.restore()
    print(f"pre-emption sync point: {sync_us:.1f} µs per call ({args.calls} calls)")
    print(f"single-process flag read: {flag_us:.3f} µs per call")


if __name__ == "__main__":
    main()
