"""The crash soak of benchmarks/soak.py as two trials (the benchmark runs 20): a training run
killed with SIGKILL at a random moment after compiling (during or between checkpoint saves) and
resumed ends bitwise equal to an uninterrupted run."""

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)

import soak  # noqa: E402


def test_kill_nine_and_resume_is_bitwise_equal(tiny_shards, tmp_path):
    lines = []
    tally = soak.run_trials(
        2,
        (tiny_shards, 16),
        str(tmp_path),
        seed=1,
        max_delay=2.0,
        num_steps=10,
        report=lines.append,
    )
    assert tally["trials"] == 2 and tally["mismatches"] == 0, "\n".join(lines)
    assert tally["not_killed"] < 2, "\n".join(lines)  # At least one trial really was killed.
