"""A long run never loses good work: the non-finite guard, one writer per workdir, every setting
checked before anything is written, a resumed run held to its config, and errors that name the
file (the verified checkpoints and their fallback are in test_checkpoint.py, the crash soak in
test_soak.py)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cm_jax import checkpoint, runs, torch_files, train_state, trainer, workdir_lock
from cm_jax.evaluation import evaluate
from configs import cifar10_ct


def _config(tiny_shards, **train):
    config = cifar10_ct.get_config("test")
    config.data.dir = tiny_shards
    config.train.update(sample_every=0, **train)
    # One curriculum length K for runs of every length here: K is a constant of the train step,
    # so runs that differ only in train.num_steps then compile one program, not one each.
    config.schedule.total_steps = 12
    return config


def _files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _finite(workdir):
    import jax

    _, _, state = runs.restore_run(str(workdir), train_state.create_mesh(jax.devices()[:1]))
    return all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


# ------------------------------------------------------------------------------ non-finite
def test_nonfinite_steps_stop_the_run_and_the_good_checkpoint_stays(tiny_shards, tmp_path):
    trainer.train_and_evaluate(_config(tiny_shards, num_steps=4), str(tmp_path))
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 4
    blown = _config(tiny_shards, num_steps=12, allow_config_change=True)
    blown.optim.lr = 1e30  # Overflows within a step or two.
    with pytest.raises(trainer.NonFiniteError, match=r"not finite at step \d+.*step 4\)"):
        trainer.train_and_evaluate(blown, str(tmp_path))
    assert checkpoint.Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 4
    assert _finite(tmp_path)


def test_nonfinite_steps_can_be_skipped(tiny_shards, tmp_path):
    config = _config(tiny_shards, num_steps=6, nonfinite="skip")
    config.optim.lr = 1e30
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    skipped = [row["skipped_steps"] for row in rows if "skipped_steps" in row]
    assert skipped and skipped[-1] > 0 and skipped == sorted(skipped)
    assert _finite(tmp_path)  # Nothing non-finite was kept, nor saved.


# ------------------------------------------------------------------------------ one writer
def test_a_second_run_in_a_workdir_is_refused_naming_the_holder(tiny_shards, tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cm_jax import workdir_lock; "
            "workdir_lock.acquire(sys.argv[1], process_index=0); print('held', flush=True); "
            "time.sleep(120)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLockError, match=f"PID {holder.pid}"):
            trainer.train_and_evaluate(_config(tiny_shards), str(tmp_path))
        assert not (tmp_path / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------- settings, before any writing
@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("optim", "lr", -0.01, "optim.lr=-0.01 must be > 0"),
        ("optim", "lr", 0.0, "optim.lr=0.0 must be > 0"),
        ("train", "batch_size", 0, "train.batch_size=0 must be ≥ 1"),
        ("loss", "distance", "l3", "loss.distance='l3': use one of"),
        ("schedule", "kind", "cosine", "schedule.kind='cosine': use one of"),
        ("train", "ema_rates", (1.5,), "must lie in"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(
    tiny_shards, tmp_path, section, field, value, message
):
    config = _config(tiny_shards)
    config[section][field] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()


def test_a_rerun_with_bad_data_keeps_the_runs_files(tiny_shards, tmp_path):
    trainer.train_and_evaluate(_config(tiny_shards), str(tmp_path))
    before = _files(tmp_path)
    config = _config(tiny_shards)
    config.data.dir = str(tmp_path / "no_such_data")
    config.optim.lr = 0.5
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert _files(tmp_path) == before


def test_a_resumed_run_is_held_to_its_config(tiny_shards, tmp_path):
    trainer.train_and_evaluate(_config(tiny_shards, num_steps=2), str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    changed = _config(tiny_shards, num_steps=4)
    changed.loss.weighting = "snr"
    changed.data.seed = 7
    with pytest.raises(
        ValueError, match=r"(?s)data.seed: 0 -> 7.*loss.weighting: 'uniform' -> 'snr'"
    ):
        trainer.train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    # A harmless change (the log interval) and an allowed one go to the history. (The data seed,
    # not the weighting: the train step stays the one compiled, which saves a compile.)
    changed.loss.weighting = "uniform"
    changed.train.update(allow_config_change=True, log_every=1)
    trainer.train_and_evaluate(changed, str(tmp_path))
    (entry,) = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
    assert entry["step"] == 2
    assert entry["changes"]["data.seed"] == [0, 7]
    assert entry["changes"]["train.log_every"] == [2, 1]
    assert json.loads((tmp_path / "config.json").read_text())["data"]["seed"] == 7


def test_a_workdir_that_is_a_file_is_one_clear_error(tiny_shards, tmp_path):
    path = tmp_path / "run"
    path.write_text("not a folder")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        trainer.train_and_evaluate(_config(tiny_shards), str(path))


def test_a_missing_teacher_is_found_before_anything_is_written(tiny_shards, tmp_path):
    from configs import cifar10_cd_l2

    config = cifar10_cd_l2.get_config("test")
    config.data.dir = tiny_shards
    config.teacher.workdir = str(tmp_path / "no_teacher")
    with pytest.raises(ValueError, match="no_teacher.*has no config.json"):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- files named in errors
def test_reference_statistics_are_checked_before_sampling(tmp_path):
    keyless = tmp_path / "keyless.npz"
    np.savez(keyless, mean=np.zeros(2048))
    with pytest.raises(ValueError, match=r"keyless.npz lacks \['mu', 'n', 'sigma'\]"):
        evaluate.load_reference(str(keyless))
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(64), sigma=np.eye(64), n=10)
    with pytest.raises(ValueError, match="small.npz holds statistics of shapes"):
        evaluate.load_reference(str(small))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(small.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.npz is not a readable npz file"):
        evaluate.load_reference(str(truncated))


def test_edit_inputs_are_read_before_the_model(tmp_path):
    from ml_collections import config_dict

    from cm_jax import generate

    config = config_dict.ConfigDict({"edit": cifar10_ct.get_config("test").edit.to_dict()})
    config.edit.images = str(tmp_path / "missing.npz")
    started = time.perf_counter()
    # The workdir does not exist either: the images' error comes first.
    with pytest.raises(ValueError, match="missing.npz does not exist"):
        generate.run_edit(config, str(tmp_path / "no_run"))
    assert time.perf_counter() - started < 5


def test_torch_files_never_suggest_loading_pickles(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"net": torch.nn.Linear(2, 2)}, path)  # A pickled module, not tensors.
    with pytest.raises(torch_files.TorchFileError) as error:
        torch_files.load_tensors(str(path), "a state dict")
    message = str(error.value)
    assert "model.pt" in message and "weights_only" not in message
