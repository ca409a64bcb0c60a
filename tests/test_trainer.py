"""The sharded train step, the update order, checkpoints and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import TinyNet

from cm_jax import checkpoint, data, input_pipeline, lpips, models, optim, train_state, trainer
from configs import cifar10_ct, cifar10_edm, cifar10_ict


def _setup(config, devices, net=None):
    mesh = train_state.create_mesh(devices)
    net = net or models.create_model(config.model)
    tx, lr = optim.make_optimizer(config.optim)
    state = train_state.init_train_state(config, net, tx, mesh)
    return mesh, net, tx, lr, state


def _batches(config, mesh, steps):
    size = config.data.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    dataset = data.ImageDataset(images, np.zeros(64, np.int32))
    sharding = train_state.batch_sharding(mesh, config.train.steps_per_call)
    with input_pipeline.TrainIterator(
        dataset,
        config.train.batch_size,
        sharding,
        0,
        0,
        True,
        steps_per_call=config.train.steps_per_call,
    ) as it:
        return [batch for _, (_, batch) in zip(range(steps), it)]


def _run(config, devices, steps=2, net=None):
    mesh, net, tx, lr, state = _setup(config, devices, net)
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
    metrics = []
    for batch in _batches(config, mesh, steps):
        state, m = step_fn(state, batch, None)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def _assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_eight_devices_equal_one_device():
    config = cifar10_ict.get_config("test")  # dropout, lognormal pairs, pseudo-Huber
    assert len(jax.devices()) == 8
    state8, metrics8 = _run(config, jax.devices())
    state1, metrics1 = _run(config, jax.devices()[:1])
    for m8, m1 in zip(metrics8, metrics1):
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    _assert_trees_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
    _assert_trees_close(state8.ema_params, state1.ema_params, rtol=1e-5, atol=1e-6)


def test_scanned_steps_equal_single_steps():
    config = cifar10_ct.get_config("test")
    net = TinyNet()  # What is checked is the scan, not the network: a small one compiles fast.
    single, _ = _run(config, jax.devices(), steps=2, net=net)
    config.train.steps_per_call = 2
    scanned, _ = _run(config, jax.devices(), steps=1, net=net)
    assert int(scanned.step) == 2
    _assert_trees_close(single.params, scanned.params, rtol=1e-5, atol=1e-6)


def test_update_order_optimizer_then_eval_emas_then_target():
    config = cifar10_ct.get_config("test")  # μ(0) = 0.9^{2/(2−1)} = 0.81 (official formula)
    mesh, net, tx, lr, state0 = _setup(config, jax.devices())
    p0 = jax.device_get(state0.params)
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
    state1, metrics = step_fn(state0, _batches(config, mesh, 1)[0], None)
    state1 = jax.device_get(state1)
    assert float(metrics["target_ema"]) == pytest.approx(0.81, rel=1e-6)
    assert int(state1.step) == 1
    expected_target = jax.tree.map(lambda a, b: 0.81 * a + 0.19 * b, p0, state1.params)
    _assert_trees_close(state1.target_params, expected_target, rtol=1e-6, atol=1e-7)
    for rate in config.train.ema_rates:
        expected = jax.tree.map(lambda a, b, r=rate: r * a + (1 - r) * b, p0, state1.params)
        _assert_trees_close(
            state1.ema_params[train_state.ema_key(rate)], expected, rtol=1e-6, atol=1e-7
        )
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state1.params))
    ]
    assert max(moved) > 0


def test_ict_target_equals_the_online_network():
    config = cifar10_ict.get_config("test")
    state, metrics = _run(config, jax.devices(), steps=1)
    assert metrics[0]["target_ema"] == 0.0
    _assert_trees_close(state.target_params, state.params, rtol=0, atol=0)


def test_edm_state_has_no_target_network():
    config = cifar10_edm.get_config("test")
    state, metrics = _run(config, jax.devices(), steps=1)
    assert state.target_params is None and np.isfinite(metrics[0]["loss"])


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("batch_size", 12, "not divisible by the 8 devices"),
        ("save_every", 3, "train.save_every=3 must be a multiple"),
        ("log_every", 0, "train.log_every=0"),
        ("ema_rates", (1.5,), "must lie in"),
    ],
)
def test_bad_train_settings_are_clear_errors(field, value, match):
    config = cifar10_ct.get_config("test")
    config.train.steps_per_call = 2 if field == "save_every" else 1
    setattr(config.train, field, value)
    with pytest.raises(ValueError, match=match):
        trainer.validate_config(config)


def test_state_saved_on_eight_devices_restores_on_one(tmp_path):
    config = cifar10_ct.get_config("test")
    _, _, _, _, state8 = _setup(config, jax.devices())
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(7, state8, {"data_seed": 0})
    ckpt.wait()
    _, _, _, _, template = _setup(config, jax.devices()[:1])
    template = template.replace(params=jax.tree.map(jnp.zeros_like, template.params))
    restored, meta = ckpt.restore(template)
    assert meta == {"data_seed": 0}
    leaf = jax.tree.leaves(restored.params)[0]
    assert leaf.sharding.device_set == {jax.devices()[0]}
    _assert_trees_close(jax.device_get(restored), jax.device_get(state8), rtol=0, atol=0)
    ckpt.close()


def test_checkpoint_of_another_model_is_a_clear_error_and_is_kept(tmp_path):
    config = cifar10_ct.get_config("test")
    _, _, _, _, state = _setup(config, jax.devices())
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, state, {})
    ckpt.wait()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    config.model.nf = 16
    _, _, _, _, other = _setup(config, jax.devices())
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        ckpt.restore(other)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    ckpt.close()


def test_lpips_without_vgg_weights_is_a_clear_error():
    config = cifar10_ct.get_config("test")
    config.loss.distance = "lpips"
    with pytest.raises(lpips.LPIPSWeightsError, match="lpips_vgg_path is empty"):
        trainer.load_frozen_networks(config, train_state.create_mesh())


# --------------------------------------------------------------------------- microbatches
def _mean_square_gradient(weights):
    """A deterministic per-example loss and its gradient, in accumulate_gradient's form."""

    def gradient(rows, key):
        def loss(w):
            per_example = jnp.mean((rows["image"] * w) ** 2, axis=(1, 2, 3))
            return jnp.mean(per_example), {"loss": jnp.mean(per_example)}

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(weights)
        return grads, metrics

    return gradient


def test_accumulated_gradient_equals_the_whole_batch_gradient():
    mesh = train_state.create_mesh(jax.devices())
    rng = np.random.default_rng(1)
    images = jax.device_put(
        rng.normal(size=(32, 4, 4, 3)).astype(np.float32), train_state.batch_sharding(mesh)
    )
    batch = {"image": images, "label": jnp.zeros(32, jnp.int32)}
    gradient = _mean_square_gradient(jnp.asarray(rng.normal(size=(3,)), jnp.float32))
    run = jax.jit(
        lambda b, k: trainer.accumulate_gradient(gradient, b, jax.random.PRNGKey(0), k, mesh),
        static_argnums=1,
    )
    whole, whole_metrics = run(batch, 1)
    for k in (2, 4):
        grads, metrics = run(batch, k)
        np.testing.assert_allclose(grads, whole, rtol=1e-6)
        assert float(metrics["loss"]) == pytest.approx(float(whole_metrics["loss"]), rel=1e-6)


def test_each_microbatch_sees_every_kth_row_with_its_own_key():
    mesh = train_state.create_mesh(jax.devices())
    k, key = 4, jax.random.PRNGKey(3)

    def gradient(rows, slice_key):
        # Row r's entry of the "gradient" is the slice's key drawn as a number, so the mean
        # over slices shows which slice held row r, and with which key.
        draw = jax.random.uniform(slice_key)
        return jax.nn.one_hot(rows["label"], 32).sum(axis=0) * draw, {}

    batch = {"image": jnp.zeros((32, 2, 2, 3)), "label": jnp.arange(32)}
    batch = jax.device_put(batch, train_state.batch_sharding(mesh))
    grads, _ = jax.jit(lambda b: trainer.accumulate_gradient(gradient, b, key, k, mesh))(batch)
    draws = np.array([float(jax.random.uniform(jax.random.fold_in(key, j))) for j in range(k)])
    expected = draws[np.arange(32) % k] / k  # row r in slice r mod k
    np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-6)
    assert len(set(draws)) == k


def test_microbatched_step_agrees_on_eight_devices_and_one():
    config = cifar10_ict.get_config("test")  # lognormal pairs, pseudo-Huber
    config.train.microbatches = 2
    net = TinyNet()  # What is checked is the slicing of a sharded batch, not the network.
    state8, metrics8 = _run(config, jax.devices(), net=net)
    state1, metrics1 = _run(config, jax.devices()[:1], net=net)
    for m8, m1 in zip(metrics8, metrics1):
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    _assert_trees_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)


def _step_temp_bytes(config):
    mesh, net, tx, lr, state = _setup(config, jax.devices()[:1], TinyNet())
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
    batch = _batches(config, mesh, 1)[0]
    return step_fn.lower(state, batch, None).compile().memory_analysis().temp_size_in_bytes


def test_microbatches_cut_the_step_memory():
    config = cifar10_ict.get_config("test")
    config.train.batch_size = 32
    whole = _step_temp_bytes(config)
    config.train.microbatches = 4
    sliced = _step_temp_bytes(config)
    assert sliced < 0.5 * whole, (sliced, whole)


def test_microbatches_that_do_not_divide_a_devices_rows_are_a_clear_error():
    config = cifar10_ict.get_config("test")  # batch 8 on 8 devices: one row each
    config.train.microbatches = 2
    with pytest.raises(ValueError, match="train.microbatches=2 must .* divide the 1 rows"):
        trainer.validate_config(config)
