"""launch.py end to end, as one process: pre-empted by SIGTERM, the run saves and exits 0;
restarted, it resumes and finishes with exactly the state of an uninterrupted run (conftest.py's
`launch_reference`). A `kill -9` at random moments is test_soak.py's; both processes of a pod
killed, or one pre-empted, test_multihost.py's."""

import json
import os
import signal

import numpy as np
from launches import (
    SAVE_EVERY,
    STEPS,
    checkpoint_steps,
    final_state,
    log_text,
    start,
    tail,
    train_flags,
    wait,
    wait_for_checkpoint,
)


def test_a_preempted_run_resumes_exactly(launch_reference, tmp_path, tiny_shards):
    workdir = tmp_path / "interrupted"
    flags = train_flags(workdir, tiny_shards)
    proc = start(flags, tmp_path / "first.log")
    wait_for_checkpoint([proc], workdir, SAVE_EVERY)
    proc.send_signal(signal.SIGTERM)  # What a scheduler sends before pre-emption.
    assert wait([proc]) == [0], tail(proc)
    assert "SIGTERM received" in log_text(proc)
    stopped_at = checkpoint_steps(workdir)[-1]
    assert stopped_at < STEPS

    proc = start(flags, tmp_path / "second.log")
    assert wait([proc]) == [0], tail(proc)
    assert f"Resumed from step {stopped_at}." in log_text(proc)

    a, b = final_state(launch_reference), final_state(workdir)
    assert int(a.step) == int(b.step) == STEPS
    for name in ("params", "target_params", "ema_params", "opt_state"):
        for x, y in zip(_leaves(getattr(a, name)), _leaves(getattr(b, name)), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert os.path.exists(os.path.join(workdir, "samples", f"step_{STEPS:08d}.png"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows[-1]["step"] == STEPS and np.isfinite(rows[-1]["loss"])
    assert not os.path.exists(os.path.join(workdir, "tensorboard"))  # train.tensorboard=False


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
