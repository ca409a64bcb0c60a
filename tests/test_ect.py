"""Easy consistency training (ECT, Geng et al. 2025): the gap t − r and its stages, the loss
against a recomputation by hand, and a run started from a trained EDM model."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import OracleNet, _batch, _x0
from toy_networks import tiny_model

from cm_jax import karras, methods, models, precond, runs, schedules, train_state, trainer
from cm_jax.generate import Generator
from configs import cifar10_ect

SIZE = 8


def _config(**ect_overrides):
    config = cifar10_ect.get_config("test")
    config.data.image_size = SIZE
    config.ect.update(ect_overrides)
    return config


# --------------------------------------------------------------------------- the gap
@pytest.mark.parametrize(
    "t, stage, expected",
    [
        # Stage 0, q = 2: Δt/t = ½·(1 + 8·sigmoid(−t)); sigmoid(−4) = 1/(1 + e⁴) = 0.0179862.
        (4.0, 0, 4.0 * (1.0 - 0.5 * 1.1438897)),  # 1.7122206
        (80.0, 0, 40.0),  # sigmoid(−80) ≈ 0: Δt = t/2
        (1.0, 0, 0.0),  # 1 + 8·sigmoid(−1) > 2: clamped at the data
        (math.log(7.0) - 1e-3, 0, 0.0),  # r = 0 up to t = ln 7
        (4.0, 2, 4.0 * (1.0 - 1.1438897 / 8.0)),  # 3.4280552: the gap shrank by q² = 4
    ],
)
def test_r_by_hand(t, stage, expected):
    r = float(schedules.ect_r(jnp.float32(t), stage, q=2.0, k=8.0, b=1.0))
    assert r == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_r_is_positive_just_above_ln7_and_the_const_mapping_has_no_sigmoid():
    assert 0.0 < float(schedules.ect_r(jnp.float32(math.log(7.0) + 1e-2), 0)) < 0.02
    r = schedules.ect_r(jnp.asarray([0.1, 1.0, 10.0]), 1, q=4.0, mapping="const")
    np.testing.assert_allclose(r, np.asarray([0.1, 1.0, 10.0]) * (1.0 - 1.0 / 16.0), rtol=1e-6)


def test_each_stage_shrinks_the_gap_by_q_and_stages_last_stage_steps():
    t = jnp.exp(jnp.linspace(-5.0, 4.5, 50))
    for stage in range(6):
        np.testing.assert_allclose(
            schedules.ect_dt_ratio(t, stage + 1, q=2.0),
            schedules.ect_dt_ratio(t, stage, q=2.0) / 2.0,
            rtol=1e-6,
        )
    stages = [int(schedules.ect_stage(k, 25_000)) for k in (0, 24_999, 25_000, 50_000, 199_999)]
    assert stages == [0, 0, 1, 2, 7]


@pytest.mark.parametrize(
    "overrides, num_steps, match",
    [
        ({"q": 1.0}, 100, "ect.q=1.0 must be > 1"),
        ({"stage_steps": 0}, 100, "ect.stage_steps=0"),
        ({"mapping": "cosine"}, 100, "ect.mapping='cosine'"),
        ({"q": 2.0, "stage_steps": 1}, 40, "stage 39 .* below float32"),
    ],
)
def test_bad_ect_schedules_are_clear_errors(overrides, num_steps, match):
    config = _config(**overrides)
    with pytest.raises(ValueError, match=match):
        schedules.check_ect_schedule(config.ect, num_steps)


def test_paper_and_one_hour_recipes():
    c = cifar10_ect.get_config()
    assert (c.method, c.ect.q, c.ect.k, c.ect.b, c.ect.stage_steps) == (
        "ect",
        2.0,
        8.0,
        1.0,
        25_000,
    )
    assert (c.loss.distance, c.loss.huber_c, c.loss.weighting) == ("pseudo_huber", 0.0, "ict")
    assert (c.loss.p_mean, c.loss.p_std, c.karras.sigma_min) == (-1.1, 2.0, 0.003)
    assert (c.optim.name, c.optim.lr, c.train.batch_size, c.train.num_steps) == (
        "radam",
        1e-4,
        128,
        200_000,
    )
    assert (c.model.dropout, c.data.random_flip, tuple(c.train.ema_rates)) == (
        0.2,
        False,
        (0.9999,),
    )
    assert tuple(c.sample.two_step_sigmas) == (80.0, 0.821)
    schedules.check_ect_schedule(c.ect, c.train.num_steps)  # 8 stages: Δt/t ≥ 2⁻⁸·n(t).
    one_hour = cifar10_ect.get_config("1hour")
    assert one_hour.ect.q == 256.0 and tuple(one_hour.train.ema_rates) == (0.9993,)
    assert int(schedules.ect_stage(one_hour.train.num_steps - 1, one_hour.ect.stage_steps)) == 0


# --------------------------------------------------------------------------- the loss
def test_training_scalings_are_edm_and_sampling_keeps_the_boundary():
    sigma = jnp.asarray([0.003, 0.1, 0.821, 80.0])
    edm, free = karras.edm_scalings(sigma), karras.consistency_scalings(sigma, 0.5, 0.0)
    for a, b in zip(edm, free):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(karras.consistency_scalings(jnp.float32(0.003), 0.5, 0.003).c_out) == 0.0


@pytest.mark.parametrize("step", [0, 3])
def test_loss_vanishes_for_the_exact_consistency_function(step):
    """Point-mass data: f*(x_t, t) = x0 for every t under the σ_min = 0 training scalings."""
    config = _config()
    params = {"x0": _x0()}
    batch = _batch(params["x0"])
    loss_fn = methods.get_loss_fn(OracleNet("consistency", sigma_min=0.0), config)
    loss, metrics = loss_fn(params, None, batch, jax.random.PRNGKey(step), step)
    assert float(loss) < 1e-5
    assert int(metrics["ect_stage"]) == step // 2
    assert 0.0 < float(metrics["target_at_data"]) < 1.0  # Both kinds of target occur.
    wrong = methods.get_loss_fn(OracleNet("consistency", sigma_min=0.0, error=0.05), config)
    bad, _ = wrong(params, None, batch, jax.random.PRNGKey(step), step)
    assert float(bad) > 1e-2


def _by_hand(net, params, target_params, x, rng, step, config):
    """The ECT loss written out from the same draws, with EDM's denoiser as the training f."""
    t_rng, noise_rng, _ = jax.random.split(rng, 3)
    n = x.shape[0]
    t = jnp.exp(config.loss.p_mean + config.loss.p_std * jax.random.normal(t_rng, (n,)))
    stage = step // config.ect.stage_steps
    dt_ratio = 0.5 ** (stage + 1) * (1.0 + 8.0 / (1.0 + jnp.exp(t)))
    r = jnp.maximum(t * (1.0 - dt_ratio), 0.0)
    z = jax.random.normal(noise_rng, x.shape)
    f = lambda p, s: precond.edm_denoiser(net, p, x + s[:, None, None, None] * z, s)
    online = f(params, t)
    target = jnp.where((r > 0)[:, None, None, None], f(target_params, jnp.where(r > 0, r, 1.0)), x)
    norm = jnp.sqrt(jnp.sum((online - target).reshape(n, -1) ** 2, axis=1))
    return jnp.mean(norm / (t - r)), r


@pytest.mark.parametrize("step", [1, 5])
def test_loss_and_its_gradient_equal_the_formula_by_hand(step):
    config = _config()
    net, params = tiny_model((SIZE, SIZE, 3))
    x = jax.random.uniform(jax.random.PRNGKey(7), (16, SIZE, SIZE, 3), minval=-1, maxval=1)
    batch, rng = {"image": x, "label": jnp.zeros((16,), jnp.int32)}, jax.random.PRNGKey(11)
    loss_fn = methods.get_loss_fn(net, config)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, None, batch, rng, step)
    expected, r = _by_hand(net, params, params, x, rng, step, config)
    # Stage 0 clamps r at 0 for t ≤ ln 7; from stage 2 on (Δt/t < 5/8) r > 0 for every t.
    assert bool(jnp.any(r > 0)) and bool(jnp.any(r == 0)) == (step < 4)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # The target is a constant: the gradient is the by-hand loss's with θ⁻ held fixed.
    want = jax.grad(lambda p: _by_hand(net, p, params, x, rng, step, config)[0])(params)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("boundary, sigma_min", [(False, 0.0), (True, 0.003)])
def test_online_and_target_share_dropout_and_the_training_scalings(
    monkeypatch, boundary, sigma_min
):
    seen = []
    original = precond.consistency_fn

    def spy(*args, dropout_rng=None, **kwargs):
        seen.append((np.asarray(jax.random.key_data(dropout_rng)), kwargs["sigma_min"]))
        return original(*args, dropout_rng=dropout_rng, **kwargs)

    monkeypatch.setattr(precond, "consistency_fn", spy)
    config = _config(boundary_in_training=boundary)
    net, params = tiny_model((SIZE, SIZE, 3))
    methods.get_loss_fn(net, config)(params, None, _batch(_x0(), n=4), jax.random.PRNGKey(1), 0)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    assert seen[0][1] == seen[1][1] == sigma_min


# --------------------------------------------------------------------------- the trainer
def test_ect_needs_its_pretrained_start_or_says_so():
    config = cifar10_ect.get_config("test")
    with pytest.raises(ValueError, match="teacher.workdir.*init_student=False"):
        trainer.validate_config(config)
    config.teacher.init_student = False
    trainer.validate_config(config)
    config.train.num_steps, config.ect.stage_steps = 100, 1
    with pytest.raises(ValueError, match="below float32"):
        trainer.validate_config(config)


def start_from_teacher(config, teacher_workdir, tiny_shards):
    """(frozen, the teacher's params, θ at the start) of a run of `config` on tiny_shards that
    starts from teacher_workdir, built as the trainer builds them."""
    config.data.dir = tiny_shards
    config.teacher.workdir = teacher_workdir
    net = models.create_model(config.model)
    _, frozen = trainer.load_frozen_networks(config, train_state.create_mesh())
    teacher_params = frozen["teacher"]
    return frozen, teacher_params, trainer.initial_student(config, net, frozen)


def test_ect_from_a_trained_edm_model_and_its_two_step_samples(
    teacher_workdir, tiny_shards, tmp_path
):
    config = cifar10_ect.get_config("test")
    frozen, teacher_params, start = start_from_teacher(config, teacher_workdir, tiny_shards)
    assert "teacher" not in frozen  # The loss never reads it: not passed to every step.
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(teacher_params)):
        np.testing.assert_array_equal(a, b)

    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = [row for row in rows if "loss" in row]
    assert [row["ect_stage"] for row in rows] == [0, 1]  # Logged after steps k = 1 and 3.
    assert all(np.isfinite(row["loss"]) for row in rows)
    _, _, state = runs.restore_run(str(tmp_path), train_state.create_mesh())
    assert state.target_params is None  # θ⁻ = sg(θ): the state keeps no copy.
    gen = Generator(str(tmp_path))
    two_step, _ = gen.sample(3, steps=2, batch_size=8)
    one_step, _ = gen.sample(3, batch_size=8)
    assert two_step.shape == one_step.shape == (3, 16, 16, 3)
    assert not np.array_equal(two_step, one_step)
