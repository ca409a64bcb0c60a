"""FSDP (`config.mesh.fsdp`): the state and the frozen weights split over the mesh's "fsdp"
axis train as pure data parallelism does, are really split, move between fsdp sizes through
checkpoints, and runs trained so are read back by teachers and samplers. On the 8 fake CPU
devices of conftest.py; two processes for the batch rows.

The `:test` networks are tiny: here arrays are split from 256 elements on
(train_state.FSDP_MIN_SIZE, 2^14 in real runs), so that their kernels are. Compiles are few: one
initialiser per fsdp size tested through `init_train_state` (the others start from the fsdp 1
state placed by the same rule), one step per fsdp size.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from toy_networks import TinyNet

from cm_jax import (
    checkpoint,
    config_checks,
    data,
    input_pipeline,
    models,
    optim,
    runs,
    train_state,
    trainer,
)
from cm_jax.generate import Generator
from configs import cifar10_cd_l2, cifar10_ict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 256  # FSDP_MIN_SIZE for the tiny test networks
STEPS = 2


@pytest.fixture(autouse=True, scope="module")
def tiny_arrays_are_split():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_state, "FSDP_MIN_SIZE", SMALL)
        yield


def _config(fsdp):
    config = cifar10_ict.get_config("test")  # dropout, lognormal pairs, pseudo-Huber, θ⁻ = θ
    config.mesh.fsdp = fsdp
    return config


def _batches(config, mesh, steps):
    size = config.data.image_size
    images = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    dataset = data.ImageDataset(images, np.zeros(64, np.int32))
    sharding = train_state.batch_sharding(mesh)
    with input_pipeline.TrainIterator(dataset, config.train.batch_size, sharding, 0, 0, True) as it:
        return [batch for _, (_, batch) in zip(range(steps), it)]


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


_INITIAL, _RUNS = {}, {}


def _initial_state():
    """The fsdp 1 initial state, on the host."""
    if not _INITIAL:
        config = _config(1)
        net = models.create_model(config.model)
        tx, _ = optim.make_optimizer(config.optim)
        mesh = train_state.config_mesh(config)
        _INITIAL["state"] = jax.device_get(train_state.init_train_state(config, net, tx, mesh))
    return _INITIAL["state"]


def _train(fsdp):
    """(mesh, state, losses) after STEPS steps with mesh.fsdp = fsdp, from the fsdp 1 initial
    state placed by train_state.shardings; kept for the other tests of this module."""
    if fsdp not in _RUNS:
        config = _config(fsdp)
        mesh = train_state.config_mesh(config)
        net = models.create_model(config.model)
        tx, lr = optim.make_optimizer(config.optim)
        initial = _initial_state()
        state = jax.device_put(initial, train_state.shardings(initial, mesh))
        step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
        losses = []
        for batch in _batches(config, mesh, STEPS):
            state, metrics = step_fn(state, batch, None)
            losses.append(float(metrics["loss"]))
        _RUNS[fsdp] = mesh, state, losses
    return _RUNS[fsdp]


def test_sharding_rule():
    rule = train_state.fsdp_spec
    assert rule((3, 3, 256, 256), 8) == P(None, None, None, "fsdp")  # equal dims: the last
    assert rule((4096, 1000), 8) == P("fsdp")  # the largest divisible dimension
    assert rule((6, 5000), 8) == P(None, "fsdp")
    assert rule((7, 9999), 8) == P()  # nothing divides
    assert rule((200,), 8) == P() and rule((), 8) == P() and rule((2,), 8) == P()  # small
    assert rule((4096, 1000), 1) == P()
    assert train_state.shard_shape((3, 3, 256, 256), 8) == (3, 3, 256, 32)
    assert train_state.shard_shape((7, 9999), 8) == (7, 9999)


def test_init_places_the_state_by_the_rule():
    config = _config(4)
    mesh = train_state.config_mesh(config)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    net = models.create_model(config.model)
    tx, _ = optim.make_optimizer(config.optim)
    state = train_state.init_train_state(config, net, tx, mesh)
    abstract = train_state.abstract_train_state(config, net, tx, mesh)
    expected = train_state.shardings(state, mesh)
    for x, t, s in zip(*(jax.tree.leaves(tree) for tree in (state, abstract, expected))):
        assert x.sharding == t.sharding == s, (x.shape, x.sharding, t.sharding)
    _assert_trees_close(jax.device_get(state), _initial_state(), rtol=0, atol=0)


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_fsdp_trains_as_pure_data_parallelism(fsdp):
    _, reference, reference_losses = _train(1)
    _, state, losses = _train(fsdp)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert int(state.step) == STEPS
    reference, state = jax.device_get(reference), jax.device_get(state)
    for part in ("params", "target_params", "ema_params", "opt_state"):
        _assert_trees_close(getattr(state, part), getattr(reference, part), rtol=1e-5, atol=1e-6)


def test_microbatches_and_scanned_steps_under_fsdp(monkeypatch):
    """Gradient accumulation (its carry held to the parameters' shardings) and lax.scan over
    stacked steps, split over fsdp 4, against fsdp 1 (TinyNet: a network that compiles fast;
    what is checked is the step around it)."""
    monkeypatch.setattr(train_state, "FSDP_MIN_SIZE", 64)
    results = {}
    for fsdp in (1, 4):
        config = _config(fsdp)
        config.train.update(batch_size=16, microbatches=2, steps_per_call=2)
        mesh = train_state.config_mesh(config)
        net = TinyNet()
        tx, lr = optim.make_optimizer(config.optim)
        state = train_state.init_train_state(config, net, tx, mesh)
        step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
        images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
        dataset = data.ImageDataset(images, np.zeros(64, np.int32))
        sharding = train_state.batch_sharding(mesh, 2)
        iterator = input_pipeline.TrainIterator(dataset, 16, sharding, 0, 0, True, steps_per_call=2)
        with iterator as it:
            _, batch = next(it)
        state, metrics = step_fn(state, batch, None)
        kernel = state.params["Conv_0"]["kernel"]  # (3, 3, 3, 8): 216 elements
        assert ("fsdp" in kernel.sharding.spec) == (fsdp > 1)
        results[fsdp] = float(metrics["loss"]), jax.device_get(state)
    assert results[4][0] == pytest.approx(results[1][0], rel=1e-5)
    assert int(results[4][1].step) == 2
    _assert_trees_close(results[4][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_the_trained_state_is_split(fsdp):
    mesh, state, _ = _train(fsdp)
    split = 0
    for x in jax.tree.leaves(state):
        shard = x.addressable_shards[0].data.nbytes
        assert x.sharding == train_state.shardings(x, mesh)  # kept through the steps
        if "fsdp" in x.sharding.spec:
            assert shard * fsdp == x.nbytes, (x.shape, x.sharding.spec)
            split += x.nbytes
        else:
            assert shard == x.nbytes
    # Every array of a NCSN++ kernel's size is split (θ, θ⁻, both EMAs, Adam's two moments),
    # the count and the rng key are not; the memory table's arithmetic is what the devices hold.
    kernel = state.params["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"]
    assert kernel.shape == (3, 3, 8, 8) and kernel.sharding.spec == P(None, None, None, "fsdp")
    assert state.rng.sharding.spec == P() and state.step.sharding.spec == P()
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
    assert held == train_state.per_device_bytes(state, fsdp)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    assert held == total - split + split // fsdp
    assert split > 0.6 * total


def test_checkpoints_move_between_fsdp_sizes(tmp_path):
    config = _config(1)
    net = models.create_model(config.model)
    tx, _ = optim.make_optimizer(config.optim)
    for saved, restored_fsdp in ((4, 1), (1, 4)):
        _, state, _ = _train(saved)
        ckpt = checkpoint.Checkpointer(tmp_path / f"fsdp{saved}", keep=2)
        ckpt.save(STEPS, state, {"data_seed": 0})
        ckpt.wait()
        mesh = train_state.create_mesh(fsdp=restored_fsdp)
        template = train_state.abstract_train_state(config, net, tx, mesh)
        restored, _ = ckpt.restore(template)  # verifies the digest saved from the other layout
        ckpt.close()
        for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(template)):
            assert x.sharding == t.sharding
        _assert_trees_close(jax.device_get(restored), jax.device_get(state), rtol=0, atol=0)
        assert checkpoint.state_digest(restored) == checkpoint.state_digest(state)
    # Resuming with another fsdp is no change of the math: recorded, not refused.
    saved_config = json.loads(_config(4).to_json_best_effort())
    assert config_checks.check_resume(saved_config, _config(1)) == {"mesh.fsdp": (4, 1)}


@pytest.mark.parametrize("fsdp", [3, 0, 16])
def test_an_fsdp_that_does_not_divide_the_devices_is_one_clear_error(fsdp):
    config = _config(fsdp)
    match = f"mesh.fsdp={fsdp} must be at least 1 and divide the 8 devices"
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(config)
    with pytest.raises(ValueError, match=match):
        train_state.config_mesh(config)


# ------------------------------------------------------------------ a sharded CD run
@pytest.fixture(scope="module")
def sharded_cd_run(tmp_path_factory, teacher_workdir, tiny_shards):
    """A CD run trained with mesh.fsdp=4 (its teacher, trained replicated, sharded on the
    student's mesh): (config, workdir)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_state, "FSDP_MIN_SIZE", SMALL)
        workdir = str(tmp_path_factory.mktemp("cd_fsdp4"))
        config = cifar10_cd_l2.get_config("test")
        config.data.dir = tiny_shards
        config.teacher.workdir = teacher_workdir
        config.mesh.fsdp = 4
        config.train.update(num_steps=STEPS, save_every=STEPS, sample_every=0)
        trainer.train_and_evaluate(config, workdir)
    return config, workdir


def _is_split(tree):
    kernels = [x for x in jax.tree.leaves(tree) if x.size >= SMALL and x.shape[-1] % 4 == 0]
    return bool(kernels) and all("fsdp" in x.sharding.spec for x in kernels)


def test_cd_trains_with_a_sharded_teacher(sharded_cd_run):
    config, workdir = sharded_cd_run
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert rows[-1]["step"] == STEPS and np.isfinite(rows[-1]["loss"])
    mesh = train_state.config_mesh(config)
    _, frozen = trainer.load_frozen_networks(config, mesh)
    assert _is_split(frozen["teacher"])
    # Read back as it was trained (the run's own mesh), and on one device.
    run_config, _, state = runs.restore_run(workdir)
    assert run_config.mesh.fsdp == 4 and _is_split(state.params) and _is_split(state.opt_state)
    _, _, single = runs.restore_run(workdir, jax.devices()[:1])
    assert jax.tree.leaves(single.params)[0].sharding.device_set == {jax.devices()[0]}
    _assert_trees_close(jax.device_get(single), jax.device_get(state), rtol=0, atol=0)


def test_generator_samples_with_sharded_params(sharded_cd_run):
    _, workdir = sharded_cd_run
    gen = Generator(workdir)
    assert dict(gen.mesh.shape) == {"data": 2, "fsdp": 4} and _is_split(gen.params)
    images, _ = gen.sample(8, seed=3, batch_size=8)
    whole = train_state.create_mesh()
    host = jax.device_get(gen.params)
    replicated = Generator.from_params(gen.config, gen.net, host, whole, gen.step)
    assert all(x.sharding.spec == P() for x in jax.tree.leaves(replicated.params))
    expected, _ = replicated.sample(8, seed=3, batch_size=8)
    assert images.shape == (8, 16, 16, 3)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


# ------------------------------------------------------------------ two processes
_TWO_PROCESSES = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[3])
from cm_jax import distributed
distributed.initialize(f"127.0.0.1:{sys.argv[1]}", 2, int(sys.argv[2]), timeout_s=120)
import jax, numpy as np
from cm_jax import data, input_pipeline, train_state
rng = np.random.default_rng(0)
dataset = data.ImageDataset(
    rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8), np.arange(32, dtype=np.int32)
)
weights = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
out = {}
for fsdp in (1, 2, 4):
    mesh = train_state.create_mesh(fsdp=fsdp)
    # The iterator checks that this process's devices hold the rows it produces.
    sharding = train_state.batch_sharding(mesh)
    with input_pipeline.TrainIterator(dataset, 8, sharding, 0, 0, False) as it:
        _, batch = next(it)
    w = distributed.to_global(weights, train_state.shardings(weights, mesh))
    total = jax.jit(lambda a: (a * a).sum(), out_shardings=train_state.replicated(mesh))(w)
    out[fsdp] = {
        "labels": distributed.to_host(batch["label"]).tolist(),
        "spec": str(w.sharding.spec),
        "held": w.addressable_shards[0].data.shape,
        "sum": float(distributed.to_host(total)),
    }
print("RESULT " + json.dumps(out), flush=True)
"""


def test_two_processes_hold_their_rows_under_fsdp(tmp_path):
    """2 processes × 2 devices: the batch rows of every process stay its own with fsdp 2
    (within a process) and 4 (across both), and a state array split over them sums right."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(port), str(i), REPO],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    results = []
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        line = [x for x in output.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    assert results[0] == results[1]
    expected_sum = float((np.arange(64 * 256, dtype=np.float64) ** 2).sum())
    labels = results[0]["1"]["labels"]
    assert sorted(labels) == sorted(set(labels)) and len(labels) == 8
    for fsdp in ("1", "2", "4"):
        got = results[0][fsdp]
        assert got["labels"] == labels  # the same global batch whatever the mesh
        assert got["sum"] == pytest.approx(expected_sum, rel=1e-6)
        assert got["held"] == [64, 256 // int(fsdp)]
