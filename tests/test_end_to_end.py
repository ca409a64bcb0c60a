"""launch.py end to end: train, be killed (SIGTERM, then kill -9), resume, and finish with
exactly the parameters of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from subprocess_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30


def _command(workdir, data_dir):
    return [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        f"--config={os.path.join(ROOT, 'configs', 'cifar10_ict.py')}:test",
        f"--workdir={workdir}",
        f"--config.data.dir={data_dir}",
        f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.save_every=5",
        "--config.train.log_every=5",
        "--config.train.sample_every=15",
        "--config.train.keep_checkpoints=2",
        "--config.train.tensorboard=False",  # TensorFlow's import would add ~7 s to each start.
    ]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags(2)  # a sharded run
    return env


def _start(workdir, data_dir):
    return subprocess.Popen(
        _command(workdir, data_dir),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _checkpoint_steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _wait_for_checkpoint(proc, workdir, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if _checkpoint_steps(workdir):
            return
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def _final_state(workdir):
    """The last checkpoint of a run, read back with the config the run wrote."""
    import jax

    from cm_jax import runs, train_state

    mesh = train_state.create_mesh(jax.devices()[:1])
    _, _, state = runs.restore_run(workdir, mesh)
    assert int(state.step) == NUM_STEPS
    return jax.device_get(state)


def test_interrupted_runs_resume_exactly(tmp_path, tiny_shards):
    data_dir = tiny_shards

    reference = str(tmp_path / "reference")
    _finish(_start(reference, data_dir))

    interrupted = str(tmp_path / "interrupted")
    proc = _start(interrupted, data_dir)
    _wait_for_checkpoint(proc, interrupted)
    proc.send_signal(signal.SIGTERM)  # What a scheduler sends before pre-emption.
    out = _finish(proc)
    assert "SIGTERM received" in out
    stopped_at = _checkpoint_steps(interrupted)[-1]
    assert stopped_at < NUM_STEPS

    proc = _start(interrupted, data_dir)  # Resume, then die without warning.
    deadline = time.time() + 300
    while _checkpoint_steps(interrupted)[-1] <= stopped_at:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert _checkpoint_steps(interrupted)[-1] < NUM_STEPS

    out = _finish(_start(interrupted, data_dir))
    assert "Resumed from step" in out

    a, b = _final_state(reference), _final_state(interrupted)
    for name in ("params", "target_params", "ema_params", "opt_state"):
        for x, y in zip(_leaves(getattr(a, name)), _leaves(getattr(b, name)), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert os.path.exists(os.path.join(reference, "samples", f"step_{15:08d}.png"))
    rows = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert rows[-1]["step"] == NUM_STEPS and np.isfinite(rows[-1]["loss"])
    assert not os.path.exists(os.path.join(reference, "tensorboard"))  # train.tensorboard=False


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
