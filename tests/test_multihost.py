"""Multi-host runs as a pod or cluster runs them: `launch.py` started as 2 processes × 2 CPU
devices over 127.0.0.1 (gloo collectives, --coordinator_address/--num_processes/--process_id),
against one process with the same 4 devices.

- training killed (SIGKILL, both processes), restarted, pre-empted (SIGTERM to one process
  only: both save the same step and exit 0) and restarted again ends with the parameters of an
  uninterrupted one-process run;
- --mode=sample and --mode=stats as two processes write their files once, with the images and
  statistics of one process;
- start-up mistakes are one clear error.

The one-process run they are held to is conftest.py's `launch_reference` (tests/launches.py
says how the processes are started and which compile cache each one uses).
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from launches import (
    REPO,
    SAVE_EVERY,
    STEPS,
    checkpoint_steps,
    env,
    final_state,
    free_port,
    log_text,
    pair,
    start,
    tail,
    train_flags,
    wait,
    wait_for_checkpoint,
)


def _assert_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """Two npz shards of 8 random 16×16 images each: the statistics test's train split."""
    from conftest import write_random_shards

    return write_random_shards(tmp_path_factory.mktemp("small_shards"), 8, seed=1)


def _preempted_steps(procs):
    """The step each process says it saved at on pre-emption."""
    steps = []
    for proc in procs:
        lines = [line for line in log_text(proc).splitlines() if "Pre-empted: saved" in line]
        assert len(lines) == 1, tail(proc)
        steps.append(int(lines[0].split("step ")[1].split()[0]))
    return steps


def test_killed_then_preempted_pair_ends_as_one_process(launch_reference, tmp_path, tiny_shards):
    """2 processes × 2 devices: SIGKILL to both after the first checkpoint; restarted, SIGTERM
    to process 1 only after the next ones (both save the same step and exit 0); restarted again,
    the run ends with the parameters of the one-process, four-device run."""
    workdir = tmp_path / "run"
    flags = train_flags(workdir, tiny_shards)
    procs = pair(flags, tmp_path, "first")
    wait_for_checkpoint(procs, workdir, SAVE_EVERY)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    wait(procs)
    killed_at = max(checkpoint_steps(workdir))
    assert killed_at < STEPS, "killed too late to test a resume"
    assert "process 0 of 2, 4 devices (2 here, cpu)" in log_text(procs[0])

    procs = pair(flags, tmp_path, "second")
    wait_for_checkpoint(procs, workdir, killed_at + SAVE_EVERY)
    procs[1].send_signal(signal.SIGTERM)
    assert wait(procs) == [0, 0], tail(procs[0]) + tail(procs[1])
    saved = _preempted_steps(procs)
    assert saved[0] == saved[1] == max(checkpoint_steps(workdir)) < STEPS

    procs = pair(flags, tmp_path, "third")
    assert wait(procs) == [0, 0], tail(procs[0]) + tail(procs[1])
    state, expected = final_state(workdir), final_state(launch_reference)
    assert int(state.step) == int(expected.step) == STEPS
    _assert_close(state.params, expected.params, atol=1e-6)


def test_sample_as_two_processes_equals_one(launch_reference, tmp_path):
    flags = [
        "--mode=sample",
        f"--workdir={launch_reference}",
        "--config.sample.num_samples=10",
        "--config.sample.batch_size=4",
    ]
    one = start([*flags, f"--config.sample.out_dir={tmp_path / 'one'}"], tmp_path / "one.log")
    assert wait([one]) == [0], tail(one)
    procs = pair([*flags, f"--config.sample.out_dir={tmp_path / 'two'}"], tmp_path, "sample")
    assert wait(procs) == [0, 0], tail(procs[0]) + tail(procs[1])
    name = "samples_10x16x16x3.npz"
    expected = np.load(tmp_path / "one" / name)["arr_0"]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / name)["arr_0"], expected)
    writes = [log_text(proc).count("Wrote ") for proc in procs]
    assert writes == [1, 0]


def test_stats_as_two_processes_equals_one(tmp_path, small_shards, inception_weights):
    _, weights = inception_weights
    flags = [
        "--mode=stats",
        "--config=configs/cifar10_ict.py:test",
        f"--config.data.dir={small_shards}",
        f"--config.eval.inception_path={weights}",
        "--config.eval.batch_size=8",
        "--config.eval.ref_features_max=8",
    ]
    one = start([*flags, f"--workdir={tmp_path / 'one'}"], tmp_path / "one.log", cache="stats")
    assert wait([one]) == [0], tail(one)
    procs = pair([*flags, f"--workdir={tmp_path / 'two'}"], tmp_path, "stats")
    assert wait(procs) == [0, 0], tail(procs[0]) + tail(procs[1])
    name = os.path.join("eval", "ref_cifar10_train.npz")
    with np.load(tmp_path / "one" / name) as a, np.load(tmp_path / "two" / name) as b:
        for key in ("mu", "sigma", "mu_spatial", "sigma_spatial"):
            np.testing.assert_allclose(b[key], a[key], atol=1e-6, rtol=0)
        assert int(a["n"]) == int(b["n"]) == 16
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
        env=env(2, "errors"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_a_missing_peer_is_a_clear_error_after_the_timeout(tmp_path):
    port = free_port()
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
        env=env(2, "errors"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode != 0
    assert f"could not join the run through 127.0.0.1:{port} within 5 s" in proc.stderr
    assert time.time() - started < 120
    assert not os.listdir(tmp_path)  # Nothing was written.
