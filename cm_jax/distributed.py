"""Several processes (hosts) as one run: starting JAX's distributed runtime, which process
writes, host data as global arrays and back, and the pre-emption sync point.

A pod or cluster job runs the same command on every host. `initialize` must come before any
other JAX call: it joins the processes through a coordinator (process 0's address), after
which `jax.devices()` lists every host's devices and one jit runs over all of them. Every
process computes; only process 0 (`is_writer`) writes files, so a run's outputs exist once.
"""

import os
import socket
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# The cluster environments whose detection JAX's own `jax.distributed.initialize()` does
# without arguments (jax._src.clusters): Open MPI, SLURM and Cloud TPU. Kubernetes and mpi4py
# detection are left out: they would claim any pod or MPI-enabled machine as a cluster.
_AUTO_DETECTED = ("OmpiCluster", "SlurmCluster", "BaseTpuCluster", "GceTpuCluster", "GkeTpuCluster")


class DistributedStartError(RuntimeError):
    """The processes could not be joined; the message says which address and what to check."""


def _detected_cluster():
    """The name of the cluster environment JAX would initialise from, or None."""
    try:
        from jax._src import clusters  # No public API says whether a cluster is present.
    except ImportError:
        return None
    for cluster in clusters.ClusterEnv._cluster_types:
        if cluster.__name__ in _AUTO_DETECTED and cluster.is_env_present():
            return cluster.__name__
    return None


def _use_gloo_on_cpu():
    """CPU devices of several processes need a collectives implementation (gloo) for the
    all-reduces; GPUs and TPUs bring their own, and the option does not touch them."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # A JAX without the option: its default applies.
        logging.warning("This JAX cannot select gloo CPU collectives; using its default.")


def _wait_for_coordinator(address, process_id, timeout_s):
    """Return once process 0's port accepts connections; DistributedStartError after timeout_s.

    JAX's runtime aborts the whole process (no Python exception) when it cannot register with
    the coordinator in time, so its reachability is checked here first."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() >= deadline:
                raise DistributedStartError(
                    f"Process {process_id} could not join the run through {address} within "
                    f"{timeout_s} s ({type(e).__name__}: {e}). Check that process 0 was started "
                    "with the same --coordinator_address, on that host, and that the port is "
                    "reachable from here."
                ) from e
            time.sleep(0.5)


def initialize(coordinator_address="", num_processes=0, process_id=-1, timeout_s=300):
    """Join this process to the run, or run it alone.

    Explicit: coordinator_address ("host:port" of process 0), num_processes and process_id
    (plain GPU clusters, tests). Otherwise JAX's own detection of Cloud TPU pods, SLURM and
    Open MPI jobs, and a single process where none is found. Waits at most timeout_s seconds
    for the coordinator and the other processes. Returns (process_index, process_count).
    """
    explicit = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id >= 0,
    }
    if any(explicit.values()):
        missing = [flag for flag, given in explicit.items() if not given]
        if missing:
            raise DistributedStartError(
                f"A multi-process run needs --coordinator_address, --num_processes and "
                f"--process_id together; missing: {', '.join(missing)}."
            )
        if not 0 <= process_id < num_processes:
            raise DistributedStartError(
                f"--process_id={process_id} must lie in [0, --num_processes={num_processes})."
            )
        where = coordinator_address
        if process_id > 0:
            _wait_for_coordinator(coordinator_address, process_id, timeout_s)
        else:
            logging.info(
                "Process 0 of %d: coordinating at %s, waiting up to %d s for the others.",
                num_processes,
                coordinator_address,
                timeout_s,
            )
    else:
        cluster = _detected_cluster()
        if cluster is None:
            return 0, 1
        where = f"the coordinator {cluster} names"
    _use_gloo_on_cpu()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes or None,
            process_id=process_id if process_id >= 0 else None,
            initialization_timeout=int(timeout_s),
            shutdown_timeout_seconds=int(timeout_s),
        )
    except Exception as e:  # The runtime raises several types; all mean "could not join".
        lines = str(e).strip().splitlines()
        raise DistributedStartError(
            f"Process {process_id if process_id >= 0 else '?'} could not join the run through "
            f"{where} within {timeout_s} s ({type(e).__name__}: {lines[0] if lines else ''}). "
            "Check that every process was started, that process 0 runs on the coordinator's "
            "host and that its port is reachable from here."
        ) from e
    return jax.process_index(), jax.process_count()


def describe():
    """'process i of n, d devices (l here): ...' for the start-up log."""
    return (
        f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices "
        f"({jax.local_device_count()} here, {jax.devices()[0].platform})"
    )


def is_writer():
    """Whether this process writes the run's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def is_multiprocess():
    return jax.process_count() > 1


def to_global(host_array, sharding):
    """A global jax.Array with `sharding` from a host array that every process holds whole
    (sample indices, labels): each process places the parts its devices hold."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


def to_host(array):
    """The whole value of a global array on every process, as numpy (an all-gather where the
    array is split over several processes)."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def agree(flag):
    """True on every process iff `flag` is true on some process (e.g. a stop request)."""
    if not is_multiprocess():
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def reached_preemption_sync_point(sync_id):
    """Whether every process has reached the step at which to save after a pre-emption notice
    (SIGTERM to any process): JAX's sync point, asked with consecutive ids at every call of the
    train step. False without a distributed runtime."""
    return multihost_utils.reached_preemption_sync_point(int(sync_id))


def environment_summary():
    """The environment variables that decide how the run starts, for the log."""
    names = ("JAX_PLATFORMS", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    return {name: os.environ[name] for name in names if name in os.environ}
