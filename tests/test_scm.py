"""sCM (Lu & Song 2025): TrigFlow coordinates by hand, the velocity as the EDM network read in
them, the tangent of the exact consistency function, the loss and its gradient against a
closed-form network, and sCT / sCD runs through the trainer."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ect import start_from_teacher
from test_losses import OracleNet, _batch, _x0
from test_trainer import _assert_trees_close, _run
from toy_networks import TinyNet, tiny_model

from cm_jax import methods, models, precond, runs, train_state, trainer, trigflow
from cm_jax.generate import Generator
from cm_jax.methods import scm
from cm_jax.models import uncertainty
from configs import cifar10_edm, cifar10_scd, cifar10_sct

SIZE = 8
SIGMA_DATA = 0.5


def _config(method="sct", **scm_overrides):
    config = (cifar10_sct if method == "sct" else cifar10_scd).get_config("test")
    config.data.image_size = SIZE
    config.scm.update(scm_overrides)
    return config


def _with_head(network_params, config):
    return train_state.with_uncertainty_head(config, network_params, jax.random.PRNGKey(0))


# --------------------------------------------------------------------------- TrigFlow
def test_trigflow_coordinates_by_hand():
    assert float(trigflow.time_from_sigma(jnp.float32(0.5))) == pytest.approx(math.pi / 4)
    assert float(trigflow.time_from_sigma(jnp.float32(0.0))) == 0.0
    assert float(trigflow.time_from_sigma(jnp.float32(80.0))) == pytest.approx(
        math.pi / 2 - math.atan(0.5 / 80.0), rel=1e-7
    )
    assert float(trigflow.sigma_from_time(jnp.float32(math.pi / 4))) == pytest.approx(0.5)
    x0, z = jnp.full((1, 2, 2, 1), 0.6), jnp.full((1, 2, 2, 1), -0.2)
    quarter, zero = jnp.asarray([math.pi / 4]), jnp.asarray([0.0])
    # At t = π/4: x_t = (x0 + z)/√2 = 0.2828427, dx_t/dt = (z − x0)/√2 = −0.5656854.
    np.testing.assert_allclose(trigflow.noisy(x0, z, quarter), 0.4 / math.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(
        trigflow.training_velocity(x0, z, quarter), -0.8 / math.sqrt(2), rtol=1e-6
    )
    np.testing.assert_allclose(trigflow.noisy(x0, z, zero), 0.6)
    np.testing.assert_allclose(trigflow.training_velocity(x0, z, zero), -0.2)
    # x_t/cos(t) is EDM's x_σ = x0 + σ·z/σ_d with σ = σ_d·tan(t).
    t = jnp.asarray([1.2])
    sigma = float(trigflow.sigma_from_time(t)[0])
    np.testing.assert_allclose(
        trigflow.noisy(x0, z, t) / math.cos(1.2), 0.6 + sigma * (-0.2) / SIGMA_DATA, rtol=1e-5
    )


def test_tangent_warmup_and_normalisation_by_hand():
    assert [float(trigflow.tangent_warmup(k, 10)) for k in (0, 5, 10, 20)] == [0, 0.5, 1, 1]
    assert float(trigflow.tangent_warmup(0, 0)) == 1.0
    g = jnp.stack([jnp.full((2, 2, 1), 3.0), jnp.full((2, 2, 1), -0.5)])
    # rms: |g| per element / (|g| + 0.1); l2: ‖g‖ = 2|g| here (4 elements).
    np.testing.assert_allclose(
        trigflow.normalize_tangent(g, 0.1, "rms")[:, 0, 0, 0], [3.0 / 3.1, -0.5 / 0.6], rtol=1e-6
    )
    np.testing.assert_allclose(
        trigflow.normalize_tangent(g, 0.1, "l2")[:, 0, 0, 0], [3.0 / 6.1, -0.5 / 1.1], rtol=1e-6
    )
    with pytest.raises(ValueError, match="tangent norm 'max'"):
        trigflow.normalize_tangent(g, 0.1, "max")


def test_central_difference_by_hand():
    """fn = sin(t)·x² along (dx, 1): 2·sin(t)·x·dx + cos(t)·x²."""
    x, dx = jnp.full((2, 2, 2, 1), 0.8), jnp.full((2, 2, 2, 1), -0.3)
    t = jnp.asarray([0.4, 1.5])
    fn = lambda v, s: jnp.sin(s)[:, None, None, None] * v**2
    want = 2 * np.sin([0.4, 1.5]) * 0.8 * -0.3 + np.cos([0.4, 1.5]) * 0.64
    np.testing.assert_allclose(
        trigflow.central_difference(fn, x, t, dx)[:, 0, 0, 0], want, rtol=2e-3
    )


def test_velocity_is_the_edm_network_read_in_trigflow_coordinates():
    """F_θ = −F_net(x_t/σ_d, c_noise) equals (cos·x_t − D_θ(x_t/cos; σ_d·tan))/(σ_d·sin), and
    f_θ = cos·x_t − σ_d·sin·F_θ is EDM's denoiser."""
    net, params = tiny_model((SIZE, SIZE, 3))
    x_t = jax.random.normal(jax.random.PRNGKey(0), (3, SIZE, SIZE, 3))
    t = jnp.asarray([0.3, 0.8, 1.2])
    cos, sin = (f(t)[:, None, None, None] for f in (jnp.cos, jnp.sin))
    F = precond.trigflow_velocity(net, params, x_t, t)
    D = precond.edm_denoiser(net, params, x_t / cos, trigflow.sigma_from_time(t))
    assert float(jnp.std(F)) > 0.05  # A network whose output matters.
    np.testing.assert_allclose(F, (cos * x_t - D) / (SIGMA_DATA * sin), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cos * x_t - SIGMA_DATA * sin * F, D, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("step", [0, 5])  # Tangent warm-up r = 0 and r = 1.
def test_the_tangent_vanishes_for_the_exact_consistency_function(step):
    """Point-mass data: f*(x_t, t) = x0 at every t, so df*/dt = 0 and both terms of g vanish;
    a model off by a σ-dependent error is inconsistent and gets a tangent."""
    config = _config()
    params = _with_head({"x0": _x0()}, config)
    batch = _batch(params["x0"])
    exact = methods.get_loss_fn(OracleNet("edm"), config)
    _, metrics = exact(params, None, batch, jax.random.PRNGKey(step), step)
    assert float(metrics["tangent_warmup"]) == min(1.0, step / 2)
    assert float(metrics["tangent_rms"]) < 1e-3
    wrong = methods.get_loss_fn(OracleNet("consistency", sigma_min=0.0, error=0.05), config)
    _, bad = wrong(params, None, batch, jax.random.PRNGKey(step), step)
    assert float(bad["tangent_rms"]) > 1e-2


class ClosedFormNet(nn.Module):
    """F_net(x, c) = a·sin(c)·x + c², so F_θ(x_t, t) = −(a·sin(c)·x_t/σ_d + c²) with
    c = ¼·ln(σ_d·tan t), whose derivative along the JVP direction is known in closed form."""

    @nn.compact
    def __call__(self, x, c_noise, labels=None, *, train):
        a = self.param("a", nn.initializers.constant(0.7), ())
        c = c_noise[:, None, None, None]
        return a * jnp.sin(c) * x + c**2


def _loss_by_hand(a, x0, rng, step, config):
    """The sCT loss in float64 from the same draws: the JVP of ClosedFormNet's F written out.

    Along (cos·sin·v, cos·sin): dc/dt·cos·sin = ¼, so the JVP is
    −(a·cos(c)/4·x_t/σ_d + a·sin(c)·cos·sin·v/σ_d + c/2). u = 0 (a fresh head).
    Returns (loss, dloss/da, dloss/d(head bias)).
    """
    sigma_rng, noise_rng, _ = jax.random.split(rng, 3)
    n, sd = x0.shape[0], SIGMA_DATA
    sigma = np.exp(
        config.loss.p_mean
        + config.loss.p_std * np.asarray(jax.random.normal(sigma_rng, (n,)), np.float64)
    )
    z = sd * np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64)
    x0 = np.asarray(x0, np.float64)
    t = np.arctan2(sigma, sd)[:, None, None, None]
    cos, sin = np.cos(t), np.sin(t)
    c = np.log(sd * np.tan(t)) / 4.0
    x_t, v = cos * x0 + sin * z, cos * z - sin * x0
    F = -(a * np.sin(c) * x_t / sd + c**2)
    dF = -(a * np.cos(c) / 4.0 * x_t / sd + a * np.sin(c) * cos * sin * v / sd + c / 2.0)
    r = min(1.0, step / config.scm.tangent_warmup_steps)
    g = -(cos**2) * (sd * F - v) - r * (cos * sin * x_t + sd * dF)
    rms = np.sqrt(np.mean(g.reshape(n, -1) ** 2, axis=1))[:, None, None, None]
    g = g / (rms + config.scm.tangent_norm_c)
    m = np.mean(g.reshape(n, -1) ** 2, axis=1)
    loss = np.mean(m / sigma)
    dF_da = -np.sin(c) * x_t / sd
    d_a = np.mean(-2.0 / sigma * np.mean((g * dF_da).reshape(n, -1), axis=1))
    return loss, d_a, np.mean(1.0 - m / sigma)


@pytest.mark.parametrize("step", [1, 4])
def test_loss_and_its_gradient_equal_the_closed_form(step):
    config = _config()
    net = ClosedFormNet()
    params = _with_head({"a": jnp.float32(0.7)}, config)
    x = jax.random.uniform(jax.random.PRNGKey(7), (16, SIZE, SIZE, 3), minval=-1, maxval=1)
    batch, rng = {"image": x, "label": jnp.zeros((16,), jnp.int32)}, jax.random.PRNGKey(11)
    loss_fn = methods.get_loss_fn(net, config)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, None, batch, rng, step
    )
    want_loss, want_da, want_dbias = _loss_by_hand(0.7, x, rng, step, config)
    assert float(metrics["log_variance"]) == 0.0
    assert float(loss) == pytest.approx(want_loss, rel=2e-4)
    assert float(grads["a"]) == pytest.approx(want_da, rel=2e-3)
    bias = grads[uncertainty.KEY]["Dense_0"]["bias"]
    assert float(bias[0]) == pytest.approx(want_dbias, rel=2e-4)


@pytest.mark.parametrize("use_closed_form", [True, False])
def test_finite_differences_agree_with_the_jvp(use_closed_form):
    config = _config()
    if use_closed_form:
        net, params = ClosedFormNet(), {"a": jnp.float32(0.7)}
    else:
        net, params = tiny_model((SIZE, SIZE, 3))
    params = _with_head(params, config)
    x = jax.random.uniform(jax.random.PRNGKey(7), (16, SIZE, SIZE, 3), minval=-1, maxval=1)
    batch, rng = {"image": x, "label": jnp.zeros((16,), jnp.int32)}, jax.random.PRNGKey(11)
    results = []
    for jvp in ("autodiff", "finite_difference"):
        config.scm.jvp = jvp
        loss_fn = jax.value_and_grad(methods.get_loss_fn(net, config), has_aux=True)
        (loss, _), grads = loss_fn(params, None, batch, rng, 4)
        results.append((float(loss), jax.tree.leaves(grads)))
    # Measured: 2e-6 in the loss, 7e-5 of the largest gradient entry (1e-3 with a step 50×).
    assert results[0][0] == pytest.approx(results[1][0], rel=2e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-4 * float(jnp.abs(a).max()))


def test_the_online_pass_and_the_jvp_share_the_dropout_key(monkeypatch):
    seen = []
    original = precond.trigflow_velocity

    def spy(*args, dropout_rng=None, train=False, **kwargs):
        seen.append((np.asarray(jax.random.key_data(dropout_rng)), train))
        return original(*args, dropout_rng=dropout_rng, train=train, **kwargs)

    monkeypatch.setattr(precond, "trigflow_velocity", spy)
    config = _config()
    net, params = tiny_model((SIZE, SIZE, 3))
    params = _with_head(params, config)
    methods.get_loss_fn(net, config)(params, None, _batch(_x0(), n=4), jax.random.PRNGKey(1), 0)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0][0], seen[1][0])
    assert seen[0][1] and seen[1][1]


def test_uncertainty_head_starts_at_zero_and_travels_beside_the_network():
    head = uncertainty.init_params(16, jax.random.PRNGKey(0))
    assert train_state.count_params(head) == 17  # Fixed features, one linear layer.
    params = uncertainty.attach({"w": jnp.ones(2)}, head)
    np.testing.assert_array_equal(
        uncertainty.log_variance(params, jnp.linspace(-2, 2, 5), 16), np.zeros(5)
    )
    network, split_head = uncertainty.split(params)
    assert set(network) == {"w"} and split_head is head
    assert uncertainty.split({"w": 1}) == ({"w": 1}, None)
    # u = w·√2·cos(2π(ν·c + φ)) + b with ν ~ N(0, 1), φ ~ U(0, 1) fixed by seed 0 (EDM2's
    # MPFourier); only w and b are parameters.
    trained = {"Dense_0": {"kernel": jnp.full((16, 1), 0.5), "bias": jnp.full((1,), 0.25)}}
    u = uncertainty.log_variance({uncertainty.KEY: trained}, jnp.asarray([0.3, -1.0]), 16)
    rng = np.random.default_rng(0)
    freqs, phases = rng.standard_normal(16), rng.random(16)
    c = np.asarray([0.3, -1.0])[:, None]
    want = 0.5 * np.sqrt(2.0) * np.cos(2 * np.pi * (c * freqs + phases)).sum(axis=1) + 0.25
    np.testing.assert_allclose(u, want, rtol=1e-5)


# --------------------------------------------------------------------------- the trainer
def test_scm_settings_are_checked():
    trainer.validate_config(_config("sct"))
    with pytest.raises(ValueError, match="sCD distils an EDM teacher.*teacher.workdir"):
        trainer.validate_config(_config("scd"))
    with pytest.raises(ValueError, match="scm.tangent_norm='max'"):
        trainer.validate_config(_config("sct", tangent_norm="max"))
    with pytest.raises(ValueError, match="scm.tangent_norm_c=0"):
        trainer.validate_config(_config("sct", tangent_norm_c=0.0))
    with pytest.raises(ValueError, match="scm.jvp='reverse'"):
        trainer.validate_config(_config("sct", jvp="reverse"))
    cudnn = _config("sct")
    cudnn.model.attention_impl = "cudnn"  # A custom VJP: no forward-mode derivative.
    with pytest.raises(ValueError, match="cuDNN's fused attention.*finite_difference"):
        trainer.validate_config(cudnn)
    cudnn.scm.jvp = "finite_difference"
    trainer.validate_config(cudnn)
    with pytest.raises(ValueError, match="scm.jvp_eps=0.2 must lie in"):
        trainer.validate_config(_config("sct", jvp_eps=0.2))


def test_the_difference_step_follows_the_compute_dtype():
    config = _config()
    assert scm.difference_step(config) == 1e-3
    config.model.dtype = "bfloat16"
    assert scm.difference_step(config) == 0.05
    config.scm.jvp_eps = 0.02
    assert scm.difference_step(config) == 0.02


def test_paper_recipe():
    c = cifar10_sct.get_config()
    assert (c.method, c.model.embedding_type, c.model.dropout) == ("sct", "positional", 0.2)
    assert (c.loss.p_mean, c.loss.p_std, c.optim.beta2) == (-1.0, 1.4, 0.99)
    assert (c.optim.lr, c.train.batch_size, c.teacher.init_student) == (1e-4, 512, True)
    assert c.train.ema_rates[0] == pytest.approx(0.99929, abs=1e-5)  # 0.5M-image half-life
    assert c.sample.two_step_sigmas[1] == pytest.approx(0.9823798)  # t = 1.1
    assert (c.scm.tangent_norm_c, c.scm.tangent_warmup_steps) == (0.1, 10_000)
    d = cifar10_scd.get_config()
    assert (d.method, d.model.dropout, d.teacher.init_student) == ("scd", 0.0, True)
    # Both start from the sCM teacher, whose network they must have.
    teacher = cifar10_edm.get_config("scm").model
    assert c.model.to_dict() == dict(teacher.to_dict(), dropout=0.2)
    assert d.model.to_dict() == dict(teacher.to_dict(), dropout=0.0)


def test_sct_that_should_start_from_a_teacher_without_one_is_a_clear_error():
    config = cifar10_sct.get_config()
    with pytest.raises(ValueError, match="sCT starts from a pretrained diffusion model"):
        trainer.validate_config(config)
    config.teacher.init_student = False
    trainer.validate_config(config)


def test_the_sct_step_is_the_same_on_eight_devices_one_device_and_scanned():
    """The JVP and the per-example tangent norm under a sharded batch, and the traced step of
    the warm-up under lax.scan."""
    config = _config()
    net = TinyNet()
    state8, metrics8 = _run(config, jax.devices(), steps=2, net=net)
    state1, metrics1 = _run(config, jax.devices()[:1], steps=2, net=net)
    for m8, m1 in zip(metrics8, metrics1):
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    _assert_trees_close(state8.params, state1.params, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(state8.params[uncertainty.KEY]["Dense_0"]["kernel"]).sum()) > 0
    config.train.steps_per_call = 2
    scanned, _ = _run(config, jax.devices(), steps=1, net=net)
    _assert_trees_close(state8.params, scanned.params, rtol=1e-5, atol=1e-6)


def test_sct_from_scratch_trains_and_samples(tiny_shards, tmp_path):
    config = cifar10_sct.get_config("test")
    config.data.dir = tiny_shards
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rows = [row for row in rows if "loss" in row]
    assert [row["tangent_warmup"] for row in rows] == [0.5, 1.0]  # After steps k = 1 and 3.
    assert all(np.isfinite(row["loss"]) for row in rows)
    _, _, state = runs.restore_run(str(tmp_path), train_state.create_mesh())
    assert state.target_params is None
    for params in (state.params, *state.ema_params.values()):
        assert uncertainty.KEY in params  # Trained, averaged and saved with θ.
    assert float(jnp.abs(state.params[uncertainty.KEY]["Dense_0"]["bias"]).sum()) > 0
    gen = Generator(str(tmp_path))
    two_step, _ = gen.sample(3, steps=2, batch_size=8)
    one_step, _ = gen.sample(3, batch_size=8)
    assert two_step.shape == one_step.shape == (3, 16, 16, 3)
    assert not np.array_equal(two_step, one_step)


def test_scd_starts_from_its_teacher_and_distils(teacher_workdir, tiny_shards, tmp_path):
    config = cifar10_scd.get_config("test")
    frozen, teacher_params, start = start_from_teacher(config, teacher_workdir, tiny_shards)
    network, head = uncertainty.split(start)
    for a, b in zip(jax.tree.leaves(network), jax.tree.leaves(teacher_params)):
        np.testing.assert_array_equal(a, b)
    assert head is not None and "teacher" in frozen  # The loss reads the teacher.

    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)


def test_sct_from_an_edm_run_needs_its_network(teacher_workdir):
    config = cifar10_sct.get_config("test")
    config.teacher.update(workdir=teacher_workdir, init_student=True)
    mesh = train_state.create_mesh()
    _, frozen = trainer.load_frozen_networks(config, mesh)
    with pytest.raises(ValueError, match="match the teacher's model"):
        trainer.initial_student(config, models.create_model(config.model), frozen)
    config.model.embedding_type = "fourier"  # The EDM run's network.
    _, frozen = trainer.load_frozen_networks(config, mesh)
    start = trainer.initial_student(config, models.create_model(config.model), frozen)
    assert uncertainty.KEY in start and "teacher" not in frozen
