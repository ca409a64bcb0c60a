"""Verified checkpoints: digests, fallback past damaged checkpoints, retention, the workdir lock
and paths. Small pytrees and a tiny TrainState: no model is built."""

import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cm_jax import checkpoint, workdir_lock
from cm_jax.train_state import TrainState, create_mesh, replicated

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_state(seed, width=48, ema_keys=("0_999",)):
    """A replicated TrainState with a 48×48 kernel (2,304 values, like the damaged EMA kernel
    of the issue), its EMA and Adam moments; values depend on `seed`."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {
        "Dense_0": {
            "kernel": jax.random.normal(k1, (width, width)),
            "bias": jax.random.normal(k2, (width,)),
        }
    }
    state = TrainState(
        step=jnp.int32(seed),
        params=params,
        target_params=None,
        ema_params={key: jax.tree.map(lambda p: 0.5 * p, params) for key in ema_keys},
        opt_state=optax.adam(1e-3).init(params),
        rng=jax.random.PRNGKey(seed + 1),
    )
    return jax.device_put(state, replicated(create_mesh()))


def _save(directory, steps, keep=3):
    ckpt = checkpoint.Checkpointer(directory, keep=keep)
    for step in steps:
        ckpt.save(step, _tiny_state(step), {"data_seed": step})
    ckpt.wait()
    ckpt.close()


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _tree_hash(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _flip_middle(path, count=64):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2 - count // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flipped": lambda folder: _flip_middle(_largest_file(folder)),
    "truncated": lambda folder: _truncate(_largest_file(folder)),
    "deleted": lambda folder: _largest_file(folder).unlink(),
}


def _warnings(caplog, module="checkpoint.py"):
    """cm_jax.<module>'s warnings (orbax adds its own, e.g. about slow saves under load)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.pathname.endswith(os.path.join("cm_jax", module))
    ]


def _restore(directory, template=None, **kwargs):
    ckpt = checkpoint.Checkpointer(directory)
    try:
        return ckpt.restore(template or _tiny_state(0), **kwargs), ckpt
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------ the digest
def test_newest_checkpoint_is_restored_exactly_with_its_digest(tmp_path):
    _save(tmp_path, [10, 20])
    (state, meta), ckpt = _restore(tmp_path)
    _assert_equal(state, _tiny_state(20))
    assert meta == {"data_seed": 20}
    assert ckpt.restored_step == 20 and ckpt.moved_aside == []
    assert (tmp_path / "20" / "digest").is_dir()


def test_digest_sees_a_changed_value_and_swapped_values():
    x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    base = checkpoint.state_digest({"x": x})["x"]["sums"]
    changed = checkpoint.state_digest({"x": x.at[3, 4].set(np.nextafter(np.float32(28), 99))})
    swapped = x.at[0, 1].set(x[5, 2]).at[5, 2].set(x[0, 1])
    swapped_sums = checkpoint.state_digest({"x": swapped})["x"]["sums"]
    assert changed["x"]["sums"][0] != base[0]
    assert swapped_sums[0] == base[0] and swapped_sums[1] != base[1]


def test_digest_is_the_same_for_a_sharded_array_and_a_single_device_copy(tmp_path):
    mesh = create_mesh()
    values = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    sharded = {
        "w": jax.device_put(values, NamedSharding(mesh, P("data"))),
        "b": jax.device_put(values[0].astype(jnp.bfloat16), replicated(mesh)),
    }
    assert len(sharded["w"].addressable_shards) == 8
    local = jax.device_put(jax.device_get(sharded), jax.devices()[0])
    assert checkpoint.state_digest(sharded) == checkpoint.state_digest(local)

    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, sharded, {})
    ckpt.wait()
    state, _ = ckpt.restore(sharded)
    assert state["w"].sharding == sharded["w"].sharding
    _assert_equal(state, sharded)
    ckpt.close()


def test_digest_cost_on_a_million_parameters(tmp_path):
    """The digest is computed in `save` before orbax starts: it must stay small next to it."""
    keys = jax.random.split(jax.random.PRNGKey(0), 16)
    tree = {f"layer_{i}": jax.random.normal(k, (256, 256)) for i, k in enumerate(keys)}
    tree = jax.device_put(tree, replicated(create_mesh()))
    assert sum(x.size for x in jax.tree.leaves(tree)) == 2**20
    checkpoint.state_digest(tree)  # compiles once per tree structure
    start = time.perf_counter()
    for _ in range(5):
        checkpoint.state_digest(tree)
    digest_s = (time.perf_counter() - start) / 5
    ckpt = checkpoint.Checkpointer(tmp_path)
    start = time.perf_counter()
    ckpt.save(1, tree, {})
    ckpt.wait()
    save_s = time.perf_counter() - start
    ckpt.close()
    print(f"\ndigest of 2^20 float32 parameters: {digest_s * 1e3:.1f} ms; save: {save_s:.2f} s")
    assert digest_s < max(0.5 * save_s, 0.2)


# ------------------------------------------------------------------------------- fallback
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(tmp_path, caplog, damage):
    _save(tmp_path, [10, 20])
    DAMAGE[damage](tmp_path / "20")
    damaged_files = _tree_hash(tmp_path / "20")
    caplog.set_level(logging.WARNING)
    (state, meta), ckpt = _restore(tmp_path)
    _assert_equal(state, _tiny_state(10))
    assert meta == {"data_seed": 10} and ckpt.restored_step == 10
    assert [(s, p.name) for s, p, _ in ckpt.moved_aside] == [(20, "corrupt-20")]
    assert _tree_hash(tmp_path / "corrupt-20") == damaged_files  # moved, not changed
    assert not (tmp_path / "20").exists()
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [10]
    (message,) = _warnings(caplog)
    assert "20" in message and "corrupt-20" in message
    assert "\n" not in message and len(message) < 400


def test_readable_files_of_other_values_fail_the_digest(tmp_path, caplog):
    """Two runs in one workdir: step 20's arrays replaced by another state's, all readable."""
    _save(tmp_path, [10, 20])
    shutil.rmtree(tmp_path / "20" / "state")
    shutil.copytree(tmp_path / "10" / "state", tmp_path / "20" / "state")
    caplog.set_level(logging.WARNING)
    (state, _), ckpt = _restore(tmp_path)
    assert ckpt.restored_step == 10
    ((_, _, reason),) = ckpt.moved_aside
    assert "differ from the digest" in reason
    _assert_equal(state, _tiny_state(10))


def test_damaged_metadata_is_damage_not_another_model(tmp_path):
    _save(tmp_path, [10, 20])
    _truncate(tmp_path / "20" / "state" / "_METADATA")
    (_, _), ckpt = _restore(tmp_path)
    assert ckpt.restored_step == 10 and (tmp_path / "corrupt-20").is_dir()


def test_every_checkpoint_damaged_is_one_error_listing_each(tmp_path):
    _save(tmp_path, [10, 20])
    DAMAGE["truncated"](tmp_path / "10")
    DAMAGE["deleted"](tmp_path / "20")
    with pytest.raises(checkpoint.CheckpointError) as error:
        _restore(tmp_path)
    message = str(error.value)
    assert "No usable checkpoint" in message
    assert "step 20 (moved to corrupt-20)" in message and "step 10 (moved to corrupt-10)" in message
    assert len(message.splitlines()) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt-10", "corrupt-20"]


def test_damaged_digest_is_damage_but_does_not_hide_another_model(tmp_path):
    _save(tmp_path, [10, 20])
    (tmp_path / "20" / "digest" / "metadata").write_text('{"format": "cm_jax.checkp')
    before = _tree_hash(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        _restore(tmp_path, _tiny_state(0, width=32))
    assert _tree_hash(tmp_path) == before
    (_, _), ckpt = _restore(tmp_path)
    assert ckpt.restored_step == 10
    assert "its digest cannot be read (JSONDecodeError" in ckpt.moved_aside[0][2]


def test_deleted_digest_is_damage_not_an_old_checkpoint(tmp_path):
    _save(tmp_path, [10, 20])
    shutil.rmtree(tmp_path / "20" / "digest")
    (_, _), ckpt = _restore(tmp_path)
    assert ckpt.restored_step == 10 and ckpt.moved_aside[0][1].name == "corrupt-20"


def test_damaged_step_asked_for_is_an_error_without_fallback(tmp_path):
    _save(tmp_path, [10, 20])
    DAMAGE["flipped"](tmp_path / "20")
    with pytest.raises(checkpoint.CheckpointError, match="step 20"):
        _restore(tmp_path, step=20)
    assert (tmp_path / "corrupt-20").is_dir()
    with pytest.raises(
        checkpoint.CheckpointError, match=r"no checkpoint at step 20; it has \[10\]"
    ):
        _restore(tmp_path, step=20)


def test_read_only_reader_skips_damage_and_moves_nothing(tmp_path, caplog):
    _save(tmp_path, [10, 20])
    DAMAGE["truncated"](tmp_path / "20")
    before = _tree_hash(tmp_path)
    reader = checkpoint.Checkpointer(tmp_path, read_only=True)
    state, _ = reader.restore(_tiny_state(0))
    assert reader.restored_step == 10 and reader.moved_aside[0][:2] == (20, None)
    _assert_equal(state, _tiny_state(10))
    assert _tree_hash(tmp_path) == before
    reader.close()


@pytest.mark.parametrize(
    "other", [{"width": 32}, {"ema_keys": ("0_999", "0_9999")}], ids=["size", "emas"]
)
def test_checkpoint_of_another_train_state_is_an_error_and_untouched(tmp_path, other):
    _save(tmp_path, [10, 20])
    DAMAGE["flipped"](tmp_path / "10")  # even an older damaged one: nothing moves
    before = _tree_hash(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="does not match this run's train state"):
        _restore(tmp_path, _tiny_state(0, **other))
    assert _tree_hash(tmp_path) == before


def test_checkpoint_without_digest_restores_with_one_warning(tmp_path, caplog):
    """As written before digests existed: `state` and `meta` only."""
    manager = ocp.CheckpointManager(epath.Path(tmp_path), options=ocp.CheckpointManagerOptions())
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_tiny_state(5)), meta=ocp.args.JsonSave({"data_seed": 5})
    )
    manager.save(5, args=args)
    manager.wait_until_finished()
    manager.close()
    caplog.set_level(logging.WARNING)
    (state, meta), ckpt = _restore(tmp_path)
    _assert_equal(state, _tiny_state(5))
    assert meta == {"data_seed": 5} and ckpt.moved_aside == []
    assert [m for m in _warnings(caplog) if "without verification" in m] == [
        f"Checkpoint {tmp_path / '5'} predates checkpoint digests: restored without verification."
    ]


# ------------------------------------------------------------------------- two processes
_TWO_PROCESSES = textwrap.dedent(
    """
    import json, os, sys
    process_id, port, workdir, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {repo!r})
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{{port}}", num_processes=2, process_id=process_id)
    from cm_jax import checkpoint, workdir_lock

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices())

    def global_array(values, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])

    def state(step):
        rows = np.arange(4 * 300, dtype=np.float32).reshape(4, 300) * step
        bias = np.full(5, step, np.float32)
        return {{"w": global_array(rows, P("data")), "b": global_array(bias, P())}}

    lock = workdir_lock.acquire(workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    result = {{"locked": lock.path is not None}}
    if phase == "save":
        for step in (10, 20, 30):
            ckpt.save(step, state(step), {{}})
        ckpt.wait()
    else:
        restored, _ = ckpt.restore(state(1))
        expected = state(ckpt.restored_step)
        result.update(
            step=ckpt.restored_step,
            moved=[target.name for _, target, _ in ckpt.moved_aside],
            b=jax.device_get(restored["b"]).tolist(),
            own_rows_equal=all(
                np.array_equal(a.data, e.data)
                for a, e in zip(restored["w"].addressable_shards, expected["w"].addressable_shards)
            ),
        )
    ckpt.close()
    print(json.dumps(result), flush=True)
    jax.distributed.shutdown()
    """
)


def _run_two_processes(script, workdir, phase):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(workdir), phase],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def test_two_processes_agree_on_the_fallback_and_only_process_0_renames(tmp_path):
    """A 2-process run (2 CPU devices each), its array sharded over both: a truncated file and
    another run's readable state are both caught, with the same outcome on both processes."""
    script = tmp_path / "two_processes.py"
    script.write_text(_TWO_PROCESSES.format(repo=REPO))
    workdir = tmp_path / "run"
    saved = _run_two_processes(script, workdir, "save")
    assert [r["locked"] for r in saved] == [True, False]
    checkpoints = workdir / "checkpoints"
    _truncate(_largest_file(checkpoints / "30"))
    shutil.rmtree(checkpoints / "20" / "state")
    shutil.copytree(checkpoints / "10" / "state", checkpoints / "20" / "state")
    restored = _run_two_processes(script, workdir, "restore")
    assert restored[0] == restored[1] | {"locked": True}
    assert restored[1]["step"] == 10 and restored[1]["moved"] == ["corrupt-30", "corrupt-20"]
    assert restored[1]["b"] == [10.0] * 5 and restored[1]["own_rows_equal"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["10", "corrupt-20", "corrupt-30"]


# ------------------------------------------------------------------------------ retention
def test_retention_after_a_fallback_keeps_good_checkpoints_and_the_moved_one(tmp_path):
    _save(tmp_path, [10, 20], keep=2)
    DAMAGE["flipped"](tmp_path / "20")
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    state, _ = ckpt.restore(_tiny_state(0))
    assert ckpt.restored_step == 10 and ckpt.all_steps() == [10]
    moved = _tree_hash(tmp_path / "corrupt-20")
    ckpt.save(20, _tiny_state(20), {})
    ckpt.wait()
    assert ckpt.all_steps() == [10, 20]  # the newest good one survived the save
    ckpt.save(30, _tiny_state(30), {})
    ckpt.wait()
    assert ckpt.all_steps() == [20, 30]
    assert _tree_hash(tmp_path / "corrupt-20") == moved
    ckpt.close()
    (state, _), _ = _restore(tmp_path)
    _assert_equal(state, _tiny_state(30))


def test_saving_below_existing_steps_is_refused(tmp_path):
    """Orbax would delete the new checkpoint first: a sign of two runs in one workdir."""
    _save(tmp_path, [20])
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=r"later steps \[20\]"):
        ckpt.save(10, _tiny_state(10), {})
    ckpt.close()


# ------------------------------------------------------------------------------------ paths
def test_object_storage_path_reaches_orbax_unchanged(tmp_path, monkeypatch):
    """Orbax itself needs google-cloud-storage and the network for gs://: what is checked is the
    path it is given (formerly `<cwd>/gs:/bucket/run`)."""
    seen = {}

    class RecordingManager:
        def __init__(self, directory, options=None, item_handlers=None):
            seen["directory"] = directory

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", RecordingManager)
    ckpt = checkpoint.Checkpointer("gs://bucket/run/checkpoints")
    assert str(seen["directory"]) == "gs://bucket/run/checkpoints"
    assert isinstance(seen["directory"], epath.Path)
    assert str(ckpt.directory / "20") == "gs://bucket/run/checkpoints/20"
    # etils' mock backend (the local file system, under the current folder) stands in for GCS.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # TF's GCS client
    monkeypatch.chdir(tmp_path)
    with epath_testing.mock_epath():
        (tmp_path / "gs:" / "bucket" / "run" / "checkpoints" / "corrupt-20").mkdir(parents=True)
        assert str(ckpt._free_aside_path(20)[1]) == "gs://bucket/run/checkpoints/corrupt-20-2"


@pytest.mark.parametrize("kind", [str, pathlib.Path, epath.Path])
def test_local_paths_are_made_absolute(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    ckpt = checkpoint.Checkpointer(kind("run/checkpoints"))
    assert str(ckpt.directory) == str(tmp_path / "run" / "checkpoints")
    assert ckpt.directory.is_dir() and ckpt.all_steps() == []
    ckpt.close()


# ------------------------------------------------------------------------------------ lock
_HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    from cm_jax import workdir_lock
    workdir_lock.acquire({workdir!r}, process_index=0)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_second_writer_is_refused_naming_the_holder_until_it_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=REPO, workdir=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lock.WorkdirLockError) as error:
            workdir_lock.acquire(tmp_path, process_index=0)
        assert f"PID {holder.pid} on host" in str(error.value) and str(tmp_path) in str(error.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workdir_lock.acquire(tmp_path, process_index=0) as lock:
        assert lock.path == str(tmp_path / ".lock")
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_lock_is_shared_within_a_process_and_released_by_the_last_handle(tmp_path):
    first = workdir_lock.acquire(tmp_path, process_index=0)
    second = workdir_lock.acquire(tmp_path, process_index=0)  # a resume in the same process
    first.release()
    check = "from cm_jax import workdir_lock; workdir_lock.acquire({!r}, process_index=0)"
    busy = subprocess.run(
        [sys.executable, "-c", check.format(str(tmp_path))], cwd=REPO, capture_output=True
    )
    assert busy.returncode != 0 and b"WorkdirLockError" in busy.stderr
    second.release()
    free = subprocess.run([sys.executable, "-c", check.format(str(tmp_path))], cwd=REPO)
    assert free.returncode == 0


def test_lock_is_skipped_on_object_storage_and_on_other_processes(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert workdir_lock.acquire("gs://bucket/run", process_index=0).path is None
    (message,) = _warnings(caplog, "workdir_lock.py")
    assert "gs://bucket/run" in message and "skipped" in message
    assert workdir_lock.acquire(tmp_path, process_index=1).path is None
    assert not (tmp_path / ".lock").exists()
