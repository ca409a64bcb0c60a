"""Starting `launch.py` as the pod, pre-emption and crash tests do, and the one uninterrupted run
they must all end equal to (conftest.py's `launch_reference`).

Every single-process run of these tests trains TRAIN_FLAGS on 4 devices with one compile cache,
so the programs of the reference run are compiled once and read back by the others. Each
process of a two-process pair has a cache folder of its own. JAX writes the cache from process
0 alone, so process 1 compiles at every start while process 0 reads its programs back. One
folder shared by both measured no faster (the pod kill test 61 s against 62 s), and JAX's
sharing of compiled programs between processes (JAX_SHARE_BINARY_BETWEEN_HOSTS) hung it.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from subprocess_env import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
SAVE_EVERY = 4
TRAIN_FLAGS = (
    "--config=configs/cifar10_ict.py:test",
    f"--config.train.num_steps={STEPS}",
    f"--config.train.save_every={SAVE_EVERY}",
    "--config.train.log_every=4",
    "--config.train.sample_every=8",
    "--config.train.keep_checkpoints=20",
    "--config.train.tensorboard=False",  # TensorFlow's import would add ~7 s to every start.
)
DEVICES = 4  # of a single-process run; a pair has 2 × 2

# New for each test session (and each xdist worker), so that cold compiles are tested too.
_SESSION_CACHES = tempfile.mkdtemp(prefix="cm_jax_launch_jit_")


def env(devices=DEVICES, cache="one"):
    """The environment of a launch.py process: `devices` fake CPU devices, compiling as the
    test session does, into the session's compile cache folder `cache`."""
    return dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(_SESSION_CACHES, cache),
    )


def train_flags(workdir, data_dir):
    return [*TRAIN_FLAGS, f"--workdir={workdir}", f"--config.data.dir={data_dir}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(flags, log_path, devices=DEVICES, process=None, port=None, cache="one"):
    """launch.py as one process (process=None) or as process `process` of two, its output in
    log_path."""
    command = [sys.executable, "launch.py", *flags]
    if process is not None:
        command += [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process}",
            "--distributed_timeout=120",
        ]
        cache = f"p{process}"
    with open(log_path, "w") as log:  # The process writes through its own copy of the file.
        proc = subprocess.Popen(
            command, cwd=REPO, env=env(devices, cache), stdout=log, stderr=subprocess.STDOUT
        )
    proc.log_path = log_path
    return proc


def pair(flags, folder, name):
    """launch.py as 2 processes × 2 devices, their logs in folder/<name>_<i>.log."""
    port = free_port()
    return [
        start(flags, folder / f"{name}_{i}.log", devices=2, process=i, port=port) for i in range(2)
    ]


def wait(procs, timeout=900):
    """The processes' return codes; fails the test (killing all) past the timeout."""
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"timed out; log of one process:\n{tail(proc)}")
    return [proc.returncode for proc in procs]


def tail(proc, lines=40):
    with open(proc.log_path) as f:
        return "".join(f.readlines()[-lines:])


def log_text(proc):
    with open(proc.log_path) as f:
        return f.read()


def checkpoint_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def wait_for_checkpoint(procs, workdir, step, timeout=600):
    """Returns once workdir has a checkpoint at `step` or later; fails if a process ends
    first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in checkpoint_steps(workdir)):
            return
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a process ended early ({proc.returncode}):\n{tail(proc)}")
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def final_state(workdir):
    """The newest checkpoint's train state of a run, on the host (read on one device)."""
    import jax

    from cm_jax import runs, train_state

    mesh = train_state.create_mesh(jax.devices()[:1])
    _, _, state = runs.restore_run(str(workdir), mesh)
    return jax.device_get(state)
