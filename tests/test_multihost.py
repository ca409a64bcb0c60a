"""Multi-host runs as a pod or cluster runs them: `launch.py` started as 2 processes × 2 CPU
devices over 127.0.0.1 (gloo collectives, --coordinator_address/--num_processes/--process_id),
against one process with the same 4 devices.

- training killed (SIGKILL, both processes), restarted, pre-empted (SIGTERM to one process
  only: both save the same step and exit 0) and restarted again ends with the parameters of an
  uninterrupted one-process run;
- --mode=sample and --mode=stats as two processes write their files once, with the images and
  statistics of one process;
- start-up mistakes are one clear error.

Each process of a pair has its own compile cache folder for the session: the two must reach
each collective together, so both compile, or both read the cache (gloo waits only 30 s).
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from subprocess_env import xla_flags

from cm_jax import runs, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16  # Kill after step 4's save, SIGTERM after step 8's: ~6 steps before the end.
TRAIN_FLAGS = (
    "--config=configs/cifar10_ict.py:test",
    f"--config.train.num_steps={STEPS}",
    "--config.train.save_every=4",
    "--config.train.log_every=4",
    "--config.train.sample_every=0",
    "--config.train.keep_checkpoints=20",
    "--config.train.tensorboard=False",  # TensorFlow's import would add ~7 s to every start.
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One compile cache per process of a pair, new for each test session: the two processes must
# reach each collective within gloo's 30 s, so both compile a program or both read it (their
# caches stay alike: the kills below come after a checkpoint, when everything is compiled).
_SESSION_CACHES = tempfile.mkdtemp(prefix="cm_jax_multihost_jit_")


def _env(devices, cache_name):
    return dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=os.path.join(_SESSION_CACHES, cache_name),
    )


def _start(flags, log_path, devices=4, process=None, port=None, cache="one"):
    """launch.py as one process (process=None) or process `process` of two."""
    command = [sys.executable, "launch.py", *flags]
    if process is not None:
        command += [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process}",
            "--distributed_timeout=120",
        ]
        cache = f"p{process}"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        command, cwd=REPO, env=_env(devices, cache), stdout=log, stderr=subprocess.STDOUT
    )
    proc.log_path = log_path
    return proc


def _pair(flags, tmp_path, name):
    port = _free_port()
    return [
        _start(flags, tmp_path / f"{name}_{i}.log", devices=2, process=i, port=port)
        for i in range(2)
    ]


def _wait(procs, timeout=900):
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"timed out; log of one process:\n{_tail(proc)}")
    return [proc.returncode for proc in procs]


def _tail(proc, lines=40):
    with open(proc.log_path) as f:
        return "".join(f.readlines()[-lines:])


def _checkpoint_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _wait_for_checkpoint(procs, workdir, step, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in _checkpoint_steps(workdir)):
            return
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"a process ended early ({proc.returncode}):\n{_tail(proc)}")
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


def _params(workdir):
    mesh = train_state.create_mesh(jax.devices()[:1])
    _, _, state = runs.restore_run(str(workdir), mesh)
    return int(state.step), jax.device_get(state.params)


def _assert_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """The uninterrupted one-process, four-device run the multi-process runs must equal."""
    workdir = tmp_path_factory.mktemp("reference")
    flags = [*TRAIN_FLAGS, f"--workdir={workdir}", f"--config.data.dir={tiny_shards}"]
    proc = _start(flags, workdir / "launch.log")
    assert _wait([proc]) == [0], _tail(proc)
    return workdir, _params(workdir)


def _preempted_steps(procs):
    """The step each process says it saved at on pre-emption."""
    steps = []
    for proc in procs:
        lines = [line for line in open(proc.log_path) if "Pre-empted: saved" in line]
        assert len(lines) == 1, _tail(proc)
        steps.append(int(lines[0].split("step ")[1].split()[0]))
    return steps


def test_killed_then_preempted_pair_ends_as_one_process(reference, tmp_path, tiny_shards):
    """2 processes × 2 devices: SIGKILL to both after the first checkpoint; restarted, SIGTERM
    to process 1 only after the next ones (both save the same step and exit 0); restarted again,
    the run ends with the parameters of the one-process, four-device run."""
    _, (ref_step, ref_params) = reference
    workdir = tmp_path / "run"
    flags = [*TRAIN_FLAGS, f"--workdir={workdir}", f"--config.data.dir={tiny_shards}"]
    pair = _pair(flags, tmp_path, "first")
    _wait_for_checkpoint(pair, workdir, 4)
    for proc in pair:
        proc.send_signal(signal.SIGKILL)
    _wait(pair)
    killed_at = max(_checkpoint_steps(workdir))
    assert killed_at < STEPS, "killed too late to test a resume"
    assert "process 0 of 2, 4 devices (2 here, cpu)" in open(pair[0].log_path).read()

    pair = _pair(flags, tmp_path, "second")
    _wait_for_checkpoint(pair, workdir, killed_at + 4)
    pair[1].send_signal(signal.SIGTERM)
    assert _wait(pair) == [0, 0], _tail(pair[0]) + _tail(pair[1])
    saved = _preempted_steps(pair)
    assert saved[0] == saved[1] == max(_checkpoint_steps(workdir)) < STEPS

    pair = _pair(flags, tmp_path, "third")
    assert _wait(pair) == [0, 0], _tail(pair[0]) + _tail(pair[1])
    step, params = _params(workdir)
    assert step == ref_step == STEPS
    _assert_close(params, ref_params, atol=1e-6)


def test_sample_as_two_processes_equals_one(reference, tmp_path):
    workdir, _ = reference
    flags = [
        "--mode=sample",
        f"--workdir={workdir}",
        "--config.sample.num_samples=10",
        "--config.sample.batch_size=4",
    ]
    one = _start([*flags, f"--config.sample.out_dir={tmp_path / 'one'}"], tmp_path / "one.log")
    assert _wait([one]) == [0], _tail(one)
    pair = _pair([*flags, f"--config.sample.out_dir={tmp_path / 'two'}"], tmp_path, "sample")
    assert _wait(pair) == [0, 0], _tail(pair[0]) + _tail(pair[1])
    name = "samples_10x16x16x3.npz"
    expected = np.load(tmp_path / "one" / name)["arr_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / name)["arr_0"], expected)
    writes = [sum("Wrote " in line for line in open(p.log_path)) for p in pair]
    assert writes == [1, 0]


def test_stats_as_two_processes_equals_one(tmp_path, tiny_shards, inception_weights):
    _, weights = inception_weights
    flags = [
        "--mode=stats",
        "--config=configs/cifar10_ict.py:test",
        f"--config.data.dir={tiny_shards}",
        f"--config.eval.inception_path={weights}",
        "--config.eval.batch_size=8",
        "--config.eval.ref_features_max=8",
    ]
    one = _start([*flags, f"--workdir={tmp_path / 'one'}"], tmp_path / "one.log", cache="stats_one")
    assert _wait([one]) == [0], _tail(one)
    pair = _pair([*flags, f"--workdir={tmp_path / 'two'}"], tmp_path, "stats")
    assert _wait(pair) == [0, 0], _tail(pair[0]) + _tail(pair[1])
    name = os.path.join("eval", "ref_cifar10_train.npz")
    with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b:
        for key in ("mu", "sigma", "mu_spatial", "sigma_spatial"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0)
        assert int(a["n"]) == int(b["n"]) == 80
    assert not (tmp_path / "two" / "eval" / "ref_cifar10_train_pool3.partial.npy").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1"],
            "--process_id=2 must lie in [0, --num_processes=2)",
        ),
        (["--num_processes=2"], "missing: --coordinator_address, --process_id"),
    ],
)
def test_distributed_flag_mistakes_are_one_clear_error(tmp_path, extra, message):
    flags = ["--config=configs/cifar10_ict.py:test", f"--workdir={tmp_path}", *extra]
    proc = subprocess.run(
        [sys.executable, "launch.py", *flags],
        cwd=REPO,
        env=_env(2, "errors"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_missing_peer_is_a_clear_error_after_the_timeout(tmp_path):
    port = _free_port()
    flags = [
        "--config=configs/cifar10_ict.py:test",
        f"--workdir={tmp_path}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        "--process_id=1",
        "--distributed_timeout=5",
    ]
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "launch.py", *flags],
        cwd=REPO,
        env=_env(2, "errors"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert f"could not join the run through 127.0.0.1:{port} within 5 s" in proc.stderr
    assert time.time() - started < 120
    assert not os.listdir(tmp_path)  # Nothing was written.
