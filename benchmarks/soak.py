"""Crash soak: kill -9 a training run at random moments (during and between checkpoint saves),
resume it, and check that it ends bitwise equal to an uninterrupted run.

    python benchmarks/soak.py --trials=20 --data_dir=../shared/data/cifar10

Each trial starts `launch.py` on the `:test` iCT config (its tiny network, on the real CIFAR-10
at 32×32 unless --data_dir and --image_size give other npz shards), waits until the train step
is compiled, kills the process with SIGKILL after a random delay, then reruns the same command
until the run finishes, and
compares every array of the final state with the reference run's. It prints one line per trial
and the tally: trials / clean resumes / mismatches (and how many kills hit a save in progress,
seen as an unfinished orbax folder). tests/test_soak.py runs two trials in CI.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FLAGS = (
    "--config=configs/cifar10_ict.py:test",
    "--config.train.save_every=2",
    "--config.train.log_every=2",
    "--config.train.sample_every=0",
    "--config.train.keep_checkpoints=3",
)


def _command(workdir, data, num_steps, extra_flags=()):
    """data: (folder of npz shards, their image size)."""
    folder, size = data
    return [
        sys.executable,
        "launch.py",
        *FLAGS,
        f"--config.train.num_steps={num_steps}",
        f"--workdir={workdir}",
        f"--config.data.dir={folder}",
        f"--config.data.image_size={size}",
        *extra_flags,
    ]


def _run_to_end(command, log):
    """Run (or resume) until the run exits; its return code."""
    return subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode


def _state_arrays(workdir):
    """{name: numpy array} of the newest checkpoint's whole train state, on one CPU device."""
    import jax

    from cm_jax import checkpoint, runs, train_state

    mesh = train_state.create_mesh(jax.devices()[:1])
    _, _, state = runs.restore_run(str(workdir), mesh)
    return {name: jax.device_get(x) for name, x in checkpoint.named_leaves(state).items()}


def _unfinished_saves(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(folder) if "tmp" in n] if os.path.isdir(folder) else []


def _kill_after_compile(command, workdir, log, delay):
    """Start a run, SIGKILL it `delay` seconds after its train step compiled (or when it ends
    first). Returns (killed, saves left unfinished by the kill)."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log_path = log.name
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        with open(log_path) as f:
            if "Compiled the train step" in f.read():
                break
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is not None:
        return False, []
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True, _unfinished_saves(workdir)


def run_trials(
    trials,
    data,
    root,
    seed=0,
    max_delay=4.0,
    num_steps=24,
    report=print,
    reference=None,
    extra_flags=(),
):
    """Runs the reference and `trials` kill-and-resume trials under `root` on data = (npz
    folder, image size); returns the tally.

    reference: the workdir of an uninterrupted run of the same training, to use instead of
    running one; extra_flags: launch.py flags added to every run of the trials."""
    import numpy as np

    rng = random.Random(seed)
    if reference is None:
        reference = os.path.join(root, "reference")
        with open(os.path.join(root, "reference.log"), "w") as log:
            command = _command(reference, data, num_steps, extra_flags)
            if _run_to_end(command, log) != 0:
                raise RuntimeError(f"the reference run failed: see {log.name}")
    expected = _state_arrays(reference)
    tally = {"trials": 0, "clean_resumes": 0, "mismatches": 0, "killed_in_save": 0, "not_killed": 0}
    for trial in range(trials):
        workdir = os.path.join(root, f"trial_{trial}")
        delay = rng.uniform(0.0, max_delay)
        with open(os.path.join(root, f"trial_{trial}.log"), "w") as log:
            command = _command(workdir, data, num_steps, extra_flags)
            killed, unfinished = _kill_after_compile(command, workdir, log, delay)
            code = _run_to_end(command, log)
        got = _state_arrays(workdir) if code == 0 else {}
        equal = (
            code == 0
            and got.keys() == expected.keys()
            and all(np.array_equal(got[k], expected[k]) for k in expected)
        )
        tally["trials"] += 1
        tally["clean_resumes"] += int(equal)
        tally["mismatches"] += int(not equal)
        tally["killed_in_save"] += int(bool(unfinished))
        tally["not_killed"] += int(not killed)
        report(
            f"trial {trial}: kill after {delay:.2f} s ({'killed' if killed else 'ended first'}"
            f"{', during a save' if unfinished else ''}), resume exit {code}, "
            f"{'bitwise equal' if equal else 'MISMATCH'}"
        )
        if equal:
            shutil.rmtree(workdir)
    return tally


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "cifar10"))
    parser.add_argument("--image_size", type=int, default=32, help="of the data_dir's images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_delay", type=float, default=4.0, help="seconds after compiling")
    parser.add_argument("--num_steps", type=int, default=24, help="of each run (saves every 2)")
    parser.add_argument("--root", default="", help="where the runs go (default: a temp folder)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    root = args.root or tempfile.mkdtemp(prefix="cm_jax_soak_")
    os.makedirs(root, exist_ok=True)
    data = (os.path.abspath(args.data_dir), args.image_size)
    tally = run_trials(args.trials, data, root, args.seed, args.max_delay, args.num_steps)
    print(json.dumps(tally))
    clean, trials, mismatches = tally["clean_resumes"], tally["trials"], tally["mismatches"]
    print(f"{clean}/{trials} clean resumes, {mismatches} mismatches")


if __name__ == "__main__":
    main()
