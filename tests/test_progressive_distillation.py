"""Progressive distillation (PD), the CM paper's baseline: its stages, its target, its
sampler, the stage change inside the train step, and a run from a trained EDM teacher."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_losses import OracleNet, _batch, _x0
from toy_networks import tiny_model

from cm_jax import (
    data,
    karras,
    methods,
    ode,
    optim,
    precond,
    sampling,
    schedules,
    train_state,
    trainer,
)
from cm_jax.generate import Generator
from cm_jax.methods import pd
from configs import cifar10_pd

K = 50_000  # The paper config's stage length, with N_0 = 4096.


# --------------------------------------------------------------------------- the stages
def _official_num_scales(k, start=4096, per_stage=K):
    """The official `progdist` scale mode, transcribed in plain Python."""
    scales = max(start // 2 ** (k // per_stage), 2)
    sub_stage = max(k - per_stage * (np.log2(start) - 1), 0) // (per_stage * 2)
    return max(2 // 2 ** int(sub_stage), 1) if scales == 2 else scales


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, 4096),
        (K - 1, 4096),
        (K, 2048),
        (2 * K, 1024),
        (10 * K, 4),
        (11 * K - 1, 4),
        (11 * K, 2),
        (13 * K - 1, 2),
        (13 * K, 1),
        (800_000, 1),
        (10**9, 1),
    ],
)
def test_step_count_halves_every_stage_then_two_stages_of_two_and_one(k, expected):
    assert int(schedules.pd_num_scales(k)) == expected
    assert _official_num_scales(k) == expected


def test_step_counts_match_the_official_schedule_everywhere():
    ks = np.arange(0, 800_001, 1_250)
    got = np.asarray(jax.jit(schedules.pd_num_scales)(ks))
    np.testing.assert_array_equal(got, [_official_num_scales(int(k)) for k in ks])
    small = np.arange(12)  # N_0 = 4, K = 1: 4 | 2 2 | 1 …
    np.testing.assert_array_equal(
        np.asarray(schedules.pd_num_scales(small, 4, 1)),
        [_official_num_scales(int(k), 4, 1) for k in small],
    )


def test_stages_start_where_the_step_count_changes_and_the_rate_decays_within_each():
    starts = [k for k in range(0, 800_001, 2_500) if bool(schedules.pd_starts_stage(k))]
    assert starts == [K * s for s in range(1, 12)] + [13 * K]
    factor = lambda k: float(schedules.pd_lr_factor(k))
    assert factor(0) == 1.0 and factor(K // 2) == 0.5 and factor(K) == 1.0
    assert factor(K - 1) == pytest.approx(1 / K)
    assert factor(11 * K) == 1.0 and factor(12 * K) == 0.5  # N = 2 decays over 2K
    assert factor(13 * K) == 1.0 and factor(14 * K) == 0.5  # N = 1 too,
    assert factor(15 * K) == 0.0 and factor(800_000) == 0.0  # and stays at 0 after
    assert int(schedules.pd_learned_steps(K)) == 4096  # the stage just finished
    assert int(schedules.pd_learned_steps(0)) == 4096


@pytest.mark.parametrize(
    "start, per_stage, match", [(6, 10, "power of 2"), (1, 10, "power of 2"), (8, 0, "at least 1")]
)
def test_bad_pd_schedules_are_clear_errors(start, per_stage, match):
    with pytest.raises(ValueError, match=match):
        schedules.pd_num_scales(0, start, per_stage)


def test_pd_needs_the_pd_schedule():
    config = cifar10_pd.get_config("test")
    config.schedule.kind = "fixed"
    with pytest.raises(ValueError, match="needs both to be 'pd'"):
        trainer.validate_config(config)
    config = cifar10_pd.get_config("test")
    config.method = "ct"
    with pytest.raises(ValueError, match="needs both to be 'pd'"):
        trainer.validate_config(config)


# --------------------------------------------------------------------------- the target
def test_target_by_hand_for_a_linear_teacher():
    # D(x, σ) = x/2, x_hi = 1, σ: 2 → 1 → 0.5. Euler: x' = x·(1 + (σ' − σ)(1 − ½)/σ):
    # 1 → 0.75 → 0.5625; x̃ = 1 − 2·(0.5625 − 1)/(0.5 − 2) = 5/12.
    teacher = lambda x, sigma: 0.5 * x
    x_hi = jnp.ones((1, 2, 2, 1))
    sigma = lambda v: jnp.full((1,), v)
    target = pd.pd_target(teacher, x_hi, sigma(2.0), sigma(1.0), sigma(0.5))
    np.testing.assert_allclose(np.asarray(target), 5 / 12, rtol=1e-6)


def test_target_is_the_clean_image_for_an_exact_teacher():
    # Point-mass data: D* = x0, the trajectory x0 + σ·z is a straight line, which Euler follows
    # exactly, so the target is x0 whatever the noise and σ's.
    x0 = _x0()[None]
    z = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    target = pd.pd_target(
        lambda x, s: x0, x0 + 7.0 * z, jnp.array([7.0]), jnp.array([3.0]), jnp.array([0.4])
    )
    np.testing.assert_allclose(np.asarray(target), np.asarray(x0), atol=2e-6)


def _config(size=8):
    config = cifar10_pd.get_config("test")
    config.data.image_size = size
    return config


def test_loss_vanishes_for_the_exact_student_and_teacher():
    config = _config()
    params = {"x0": _x0()}
    loss_fn = methods.get_loss_fn(OracleNet("edm"), config)
    for step in (0, 1, 3):  # N = 4, 2, 1: the last is one step from σ_max to σ_min.
        loss, metrics = loss_fn(
            params, params, _batch(params["x0"]), jax.random.PRNGKey(step), step
        )
        assert int(metrics["num_scales"]) == {0: 4, 1: 2, 3: 1}[step]
        assert float(loss) < 1e-9
    # A teacher that denoises to x0 + 0.2 moves the target there: the student pays
    # weight·0.04 per example, the weight max(1/σ², 1) ≥ 1.
    teacher = {"x0": params["x0"] + 0.2}
    bad, _ = loss_fn(params, teacher, _batch(params["x0"]), jax.random.PRNGKey(0), 0)
    assert float(bad) >= 0.04 - 1e-5


def test_loss_is_the_weighted_distance_to_the_teachers_two_half_steps():
    # A small network as student and a different one as teacher, against the loss recomputed
    # here from the same draws: the interval j, the noise and the σ's of the (N+1)-point grid.
    config = _config()
    net, student = tiny_model((8, 8, 3), seed=1)
    _, teacher = tiny_model((8, 8, 3), seed=2)
    x0 = jax.random.uniform(jax.random.PRNGKey(0), (4, 8, 8, 3), minval=-1, maxval=1)
    rng = jax.random.PRNGKey(5)
    loss, _ = methods.get_loss_fn(net, config)(
        student, teacher, {"image": x0, "label": None}, rng, 1
    )
    index_rng, noise_rng, _ = jax.random.split(rng, 3)
    n = 2  # N(1) with N_0 = 4 and K = 1
    j = jax.random.randint(index_rng, (4,), 0, n)
    sigma_at = lambda i: karras.karras_sigma(i, n + 1)
    s_lo, s_mid, s_hi = sigma_at(j), sigma_at(j + 0.5), sigma_at(j + 1.0)
    x_hi = x0 + s_hi[:, None, None, None] * jax.random.normal(noise_rng, x0.shape)
    d_teacher = lambda x, s: precond.edm_denoiser(net, teacher, x, s)
    x_mid = ode.euler_step(d_teacher, x_hi, s_hi, s_mid)
    x_lo = ode.euler_step(d_teacher, x_mid, s_mid, s_lo)
    target = x_hi - s_hi[:, None, None, None] * (x_lo - x_hi) / (s_lo - s_hi)[:, None, None, None]
    d_student = precond.edm_denoiser(net, student, x_hi, s_hi)  # No dropout: train is moot.
    weight = jnp.maximum(1.0 / s_hi**2, 1.0)
    expected = jnp.mean(weight * jnp.mean((d_student - target) ** 2, axis=(1, 2, 3)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# --------------------------------------------------------------------------- the sampler
def test_sampler_takes_the_students_euler_steps():
    x0 = _x0()[None]
    z = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    params = {"x0": x0[0]}
    # Exact denoiser of point-mass data: N Euler steps land on x0 + σ_min·z (to float32
    # rounding of the 80·z terms that cancel).
    for n in (1, 4):
        x = sampling.pd_sample(OracleNet("edm"), params, z, num_steps=n)
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(jnp.clip(x0 + 0.002 * z, -1, 1)), atol=1e-4
        )
    # One step by hand, for a network that is not exact: x = 80z + (0.002 − 80)·(80z − D)/80.
    net = OracleNet("edm", error=0.3)
    d = precond.edm_denoiser(net, params, 80.0 * z, 80.0)
    by_hand = 80.0 * z + (0.002 - 80.0) * (80.0 * z - d) / 80.0
    x = sampling.pd_sample(net, params, z, num_steps=1)
    np.testing.assert_allclose(np.asarray(x), np.asarray(jnp.clip(by_hand, -1, 1)), atol=1e-4)


# --------------------------------------------------------------------------- the train step
def test_a_new_stage_makes_the_student_the_teacher_and_restarts_the_optimizer():
    config = _config()  # N_0 = 4, K = 1: stages start at k = 1 and 3
    mesh = train_state.create_mesh(jax.devices()[:1])
    net, _ = tiny_model((8, 8, 3))
    tx, lr = optim.make_optimizer(config.optim)
    state = train_state.init_train_state(config, net, tx, mesh)
    teacher0 = jax.device_get(state.target_params)
    step_fn = trainer.make_train_step(config, net, tx, lr, mesh)
    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    batch = {"image": data.normalize(images), "label": jnp.zeros((8,), jnp.int32)}
    states, metrics = [jax.device_get(state)], []
    for _ in range(4):
        state, m = step_fn(state, batch, {})
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    assert [int(m["num_scales"]) for m in metrics] == [4, 2, 2, 1]
    same = lambda a, b: all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    # k = 0 keeps the EDM teacher; k = 1 and k = 3 start stages from the θ they are given.
    assert same(states[1].target_params, teacher0)
    assert same(states[2].target_params, states[1].params)
    assert same(states[3].target_params, states[1].params)
    assert same(states[4].target_params, states[3].params)
    counts = [int(s.opt_state[1][0].count) for s in states[1:]]  # clip, then Adam's state
    assert counts == [1, 1, 2, 1]
    # Rate factors 1 | 1, ½ | 1; the EMAs restart from θ with the stage.
    assert [float(m["lr"]) for m in metrics] == pytest.approx([5e-5, 5e-5, 2.5e-5, 5e-5])
    rate = 0.9
    ema = lambda s: s.ema_params[train_state.ema_key(rate)]
    expected = jax.tree.map(
        lambda a, b: rate * a + (1 - rate) * b, states[3].params, states[4].params
    )
    for got, want in zip(jax.tree.leaves(ema(states[4])), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not same(states[4].params, states[3].params)


# --------------------------------------------------------------------------- end to end
def test_distil_a_trained_teacher_and_sample_the_student(teacher_workdir, tiny_shards, tmp_path):
    config = cifar10_pd.get_config("test")
    config.data.dir = tiny_shards
    config.teacher.workdir = teacher_workdir
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == 4 and rows[-1]["num_scales"] == 1
    assert np.isfinite(rows[-1]["loss"])
    assert (tmp_path / "samples" / "step_00000004.png").exists()

    gen = Generator(str(tmp_path))
    assert gen.pd_learned_steps == 1
    images, _ = gen.sample(3, batch_size=8)
    z = sampling.sample_noise(0, np.arange(3), gen.image_shape)
    expected = data.to_uint8(sampling.pd_sample(gen.net, gen.params, z, num_steps=1))
    # The sharded sampling program and the plain call round alike to within one level of 255.
    assert np.abs(images.astype(int) - np.asarray(expected).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="Editing needs a consistency model"):
        gen.edit("denoising", images, sigmas=(1.0,))


def test_a_student_unlike_its_teacher_is_a_clear_error(teacher_workdir, tiny_shards, tmp_path):
    config = cifar10_pd.get_config("test")
    config.data.dir = tiny_shards
    config.teacher.workdir = teacher_workdir
    config.model.nf = 16
    with pytest.raises(ValueError, match="match the teacher's model\\.$"):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
