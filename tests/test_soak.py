"""The crash soak of benchmarks/soak.py as two trials (the benchmark runs 20): a training run
killed with SIGKILL at a random moment after compiling (during or between checkpoint saves) and
resumed ends bitwise equal to an uninterrupted run (conftest.py's `launch_reference`, the same
training on as many devices)."""

import os
import sys

import launches

sys.path.insert(0, os.path.join(launches.REPO, "benchmarks"))

import soak  # noqa: E402


def test_kill_nine_and_resume_is_bitwise_equal(
    launch_reference, tiny_shards, tmp_path, monkeypatch
):
    reference_env = launches.env()  # The reference run's devices and compile cache.
    for name in ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.setenv(name, reference_env[name])
    lines = []
    tally = soak.run_trials(
        2,
        (tiny_shards, 16),
        str(tmp_path),
        seed=1,
        max_delay=2.0,
        num_steps=launches.STEPS,
        report=lines.append,
        reference=str(launch_reference),
        extra_flags=("--config.train.tensorboard=False",),
    )
    assert tally["trials"] == 2 and tally["mismatches"] == 0, "\n".join(lines)
    assert tally["not_killed"] < 2, "\n".join(lines)  # At least one trial really was killed.
