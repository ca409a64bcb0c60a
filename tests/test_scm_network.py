"""sCM's CIFAR-10 network options (Lu & Song 2025, §4.1): c_noise(t) = t and adaptive double
normalisation on NCSN++, against values worked out by hand and the unchanged defaults."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import karras, precond, sampling
from cm_jax.models import layers
from cm_jax.models.adm import ADM
from cm_jax.models.ncsnpp import NCSNpp

# nf=8 at 16×16: two levels, a BigGAN down and up block and attention at 8×8, in seconds on a CPU.
SMALL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), init_scale=1.0)
SCM = dict(SMALL, embedding_type="positional", noise_conditioning="trigflow_t")
SCM_ADN = dict(SCM, norm="adaptive_double")
SIGMA_D = 0.5


def _key(seed):
    return jax.random.key(seed, impl="rbg")  # fast to compile for many parameter shapes


def _images(batch=2, res=16, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, res, res, 3))


def _shapes(model, x, c_noise):
    """Parameter path -> shape, without computing anything."""
    init = lambda k, x, c: model.init(k, x, c, train=False)
    variables = jax.eval_shape(init, _key(0), x, c_noise)
    return {
        jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(variables)
    }


# ---------------------------------------------------------------------------------------------
# pixel normalisation and the adaptive double normalisation layer, by hand
# ---------------------------------------------------------------------------------------------


def test_pixel_norm_by_hand():
    # [3, −4, 0, 0]: mean square (9 + 16)/4 = 6.25, RMS 2.5 → [1.2, −1.6, 0, 0].
    # [2, −2, 0, 0]: mean square 2 → [√2, −√2, 0, 0]. Zero stays zero (ε keeps it finite).
    v = jnp.array([[3.0, -4.0, 0.0, 0.0], [2.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = np.asarray(layers.pixel_norm(v))
    r2 = math.sqrt(2.0)
    np.testing.assert_allclose(out[:2], [[1.2, -1.6, 0, 0], [r2, -r2, 0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(out[2], np.zeros(4))
    np.testing.assert_allclose(np.sqrt(np.mean(out[:2] ** 2, axis=-1)), [1.0, 1.0], rtol=1e-6)
    assert layers.pixel_norm(v.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def _adn_params(x, temb, kernel=None, bias=None):
    adn = layers.AdaptiveDoubleNorm()
    params = adn.init(_key(0), x, temb)["params"]
    dense = params["Dense_0"]
    if kernel is not None:
        dense = dict(kernel=kernel, bias=bias)
    return adn, {"params": {**params, "Dense_0": dense}}


def test_adaptive_double_norm_with_zero_dense_is_the_group_norm():
    """A zero Dense gives s' = b' = 0: pnorm(1 + 0) = 1 and pnorm(0) = 0, so the layer is its
    GroupNorm (with the GroupNorm's own affine) exactly."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8)) * 3.0 + 1.0
    temb = jax.random.normal(jax.random.key(1), (2, 16))
    adn, variables = _adn_params(x, temb, jnp.zeros((16, 16)), jnp.zeros((16,)))
    gn_params = {
        "scale": jnp.linspace(0.5, 2.0, 8),
        "bias": jnp.linspace(-1.0, 1.0, 8),
    }
    variables["params"]["GroupNorm_0"] = gn_params
    expected = layers.group_norm(8).apply({"params": gn_params}, x)
    np.testing.assert_array_equal(np.asarray(adn.apply(variables, x, temb)), np.asarray(expected))


def test_adaptive_double_norm_by_hand():
    """C = 4 (one group), two pixels [1,1,1,1] and [3,3,3,3]: mean 2, variance 1, so GroupNorm
    gives −1 and +1 (times 1/√(1 + 1e−6)). Dense kernel 0 and bias [s' | b'] with
    s' = [1, −3, −1, −1] → pnorm(1 + s') = pnorm([2, −2, 0, 0]) = [√2, −√2, 0, 0] and
    b' = [3, −4, 0, 0] → pnorm(b') = [1.2, −1.6, 0, 0]:
    y = ∓[√2, −√2, 0, 0] + [1.2, −1.6, 0, 0]."""
    x = jnp.array([[[[1.0] * 4, [3.0] * 4]]])  # [1, 1, 2, 4]
    temb = jnp.ones((1, 5))
    bias = jnp.array([1.0, -3.0, -1.0, -1.0, 3.0, -4.0, 0.0, 0.0])
    adn, variables = _adn_params(x, temb, jnp.zeros((5, 8)), bias)
    out = np.asarray(adn.apply(variables, x, temb))[0, 0]
    g, r2 = 1.0 / math.sqrt(1.0 + 1e-6), math.sqrt(2.0)
    expected = [
        [-g * r2 + 1.2, g * r2 - 1.6, 0.0, 0.0],
        [g * r2 + 1.2, -g * r2 - 1.6, 0.0, 0.0],
    ]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_adaptive_double_norm_scale_and_shift_have_unit_rms():
    """Whatever the Dense gives, pnorm fixes the size: every example's scale and shift vectors
    have RMS 1 over the channels, so (GroupNorm output 0) y = pnorm(b') exactly."""
    x = jnp.zeros((3, 2, 2, 8))  # GroupNorm of a constant is 0 (then its zero bias)
    temb = jax.random.normal(jax.random.key(2), (3, 16)) * 10.0
    adn, variables = _adn_params(x, temb)
    out = np.asarray(adn.apply(variables, x, temb))
    rms = np.sqrt(np.mean(out**2, axis=-1))
    np.testing.assert_allclose(rms, np.ones_like(rms), rtol=1e-5)


def test_biggan_block_with_zero_adn_dense_is_the_block_without_time_bias():
    """The block with adaptive double normalisation and a zero ADN Dense equals the default
    block with its time-bias Dense zeroed, given the same convolutions and GroupNorms: the ADN
    replaces exactly the bias + second GroupNorm."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    temb = jax.random.normal(jax.random.key(1), (2, 32))
    kw = dict(out_ch=16, down=True, fir=True, init_scale=1.0, dropout=0.0)
    adn_block = layers.ResnetBlockBigGANpp(norm="adaptive_double", **kw)
    group_block = layers.ResnetBlockBigGANpp(**kw)
    p = adn_block.init(_key(0), x, temb, False)["params"]
    assert set(p) == {"GroupNorm_0", "Conv_0", "AdaptiveDoubleNorm_0", "Conv_1", "Conv_2"}
    assert p["AdaptiveDoubleNorm_0"]["Dense_0"]["kernel"].shape == (32, 32)  # [s' | b'], C = 16
    p["AdaptiveDoubleNorm_0"]["Dense_0"] = dict(kernel=jnp.zeros((32, 32)), bias=jnp.zeros(32))
    q = {k: v for k, v in p.items() if k != "AdaptiveDoubleNorm_0"}
    q["GroupNorm_1"] = p["AdaptiveDoubleNorm_0"]["GroupNorm_0"]
    q["Dense_0"] = dict(kernel=jnp.zeros((32, 16)), bias=jnp.zeros(16))
    a = adn_block.apply({"params": p}, x, temb, False)
    b = group_block.apply({"params": q}, x, temb, False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Defaults unchanged
# ---------------------------------------------------------------------------------------------


def test_default_fields():
    model = NCSNpp()
    assert model.noise_conditioning == "log_sigma" and model.norm == "group"
    assert precond.noise_conditioning(model) == "log_sigma"
    assert precond.noise_conditioning(ADM()) == "log_sigma"  # no field: EDM's c_noise
    assert precond.noise_conditioning(NCSNpp(noise_conditioning="trigflow_t")) == "trigflow_t"


def test_defaults_give_todays_parameters_and_outputs():
    """The defaults are today's network: the same parameter tree (the block layout of the
    reference: GroupNorm_0, Conv_0, Dense_0 = the time bias of width C, GroupNorm_1, Conv_1)
    and bitwise the same outputs as the options spelled out, and precond's default c_noise is
    ¼·ln σ for the denoiser, the consistency function and the TrigFlow velocity."""
    x, sigma = _images(), jnp.array([0.05, 7.0])
    c_noise = 0.25 * jnp.log(sigma)
    default = NCSNpp(**SMALL)
    explicit = NCSNpp(**SMALL, noise_conditioning="log_sigma", norm="group")
    variables = default.init(_key(1), x, c_noise, train=False)
    assert _shapes(explicit, x, c_noise) == _shapes(default, x, c_noise)
    block = variables["params"]["ResnetBlockBigGANpp_0"]
    assert set(block) == {"GroupNorm_0", "Conv_0", "Dense_0", "GroupNorm_1", "Conv_1"}
    assert block["Dense_0"]["kernel"].shape == (32, 8)
    out = default.apply(variables, x, c_noise, train=False)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(explicit.apply(variables, x, c_noise, train=False))
    )
    # precond: c_noise = ¼·ln σ on every path, bitwise.
    s = karras.edm_scalings(sigma)
    d = karras.per_example
    manual = d(s.c_skip, x) * x + d(s.c_out, x) * default.apply(
        variables, d(s.c_in, x) * x, c_noise, train=False
    )
    den = precond.edm_denoiser(default, variables["params"], x, sigma)
    np.testing.assert_array_equal(np.asarray(den), np.asarray(manual))
    t = jnp.array([0.3, 1.2])
    vel = precond.trigflow_velocity(default, variables["params"], x, t)
    c_t = 0.25 * jnp.log(SIGMA_D * jnp.tan(t))
    np.testing.assert_array_equal(
        np.asarray(vel), np.asarray(-default.apply(variables, x / SIGMA_D, c_t, train=False))
    )


def test_adaptive_double_norm_parameter_count():
    """Each residual block's time Dense widens from C to 2C (scale and shift), and nothing else
    changes: the paper-size network grows by Σ_blocks (T·C + C), T = 4·nf."""
    x, c = (
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
    )
    group = _shapes(NCSNpp(), x, c)
    adn = _shapes(NCSNpp(norm="adaptive_double"), x, c)
    dense_widths = [s[1] for p, s in group.items() if "Resnet" in p and "Dense_0']['kernel" in p]
    assert len(dense_widths) == 33  # encoder 4·3 + 2 down, middle 2, decoder 5·3 + 2 up
    n = lambda shapes: sum(math.prod(s) for s in shapes.values())
    assert n(adn) - n(group) == sum(512 * w + w for w in dense_widths)
    assert not any("AdaptiveDoubleNorm" in p for p in group)
    ddpm = _shapes(NCSNpp(**SMALL, resblock_type="ddpm", norm="adaptive_double"), x, c)
    assert any("ResnetBlockDDPMpp_0']['AdaptiveDoubleNorm_0" in p for p in ddpm)


# ---------------------------------------------------------------------------------------------
# c_noise(t) = t on every precond path
# ---------------------------------------------------------------------------------------------


class _Spy:
    """Returns its c_noise input as the image (so the caller's output reveals it) and records
    what it was fed."""

    def __init__(self, noise_conditioning=None):
        if noise_conditioning is not None:
            self.noise_conditioning = noise_conditioning
        self.seen = []

    def apply(self, variables, x, c_noise, labels, train, rngs=None):
        self.seen.append(c_noise)
        return jnp.broadcast_to(c_noise[:, None, None, None], x.shape)


def test_every_precond_path_feeds_trigflow_t():
    t = jnp.array([0.01, math.pi / 4, math.pi / 3, 1.56])
    sigma = SIGMA_D * jnp.tan(t)  # σ_d·tan(π/4) = σ_d: t = π/4 by hand; σ_d·√3 ↔ π/3
    zeros = jnp.zeros((4, 2, 2, 3))
    spy = _Spy("trigflow_t")
    # x = 0: D = c_out·F = c_out·c_noise, f likewise; the velocity is −F = −c_noise.
    den = precond.edm_denoiser(spy, {}, zeros, sigma)[:, 0, 0, 0]
    np.testing.assert_allclose(den / karras.edm_scalings(sigma).c_out, t, rtol=1e-6)
    cm = precond.consistency_fn(spy, {}, zeros, sigma)[:, 0, 0, 0]
    np.testing.assert_allclose(cm / karras.consistency_scalings(sigma).c_out, t, rtol=1e-5)
    vel = precond.trigflow_velocity(spy, {}, zeros, t)[:, 0, 0, 0]
    np.testing.assert_array_equal(np.asarray(vel), -np.asarray(t))  # t itself, not a round trip
    # Samplers and editors go through precond: one-step sampling and the bound f of editing.py.
    spy.seen.clear()
    sampling.onestep_sample(spy, {}, zeros[:1], sigma_max=80.0)
    sampling.bind_consistency_fn(spy, {})(zeros[:1], 2.0)
    np.testing.assert_allclose(
        np.concatenate(spy.seen), [math.atan(80.0 / SIGMA_D), math.atan(2.0 / SIGMA_D)], rtol=1e-6
    )
    # Without the field (ADM, any other module): EDM's ¼·ln σ.
    plain = _Spy()
    vel = precond.trigflow_velocity(plain, {}, zeros, t)[:, 0, 0, 0]
    np.testing.assert_allclose(-vel, 0.25 * np.log(SIGMA_D * np.tan(np.asarray(t))), rtol=1e-5)
    with pytest.raises(ValueError, match="noise_conditioning='bogus'"):
        precond.edm_denoiser(_Spy("bogus"), {}, zeros, sigma)


class _Smooth:
    """F(x, c) = sin(3c)·x + c²: a smooth stand-in network with the trigflow_t field."""

    noise_conditioning = "trigflow_t"

    def apply(self, variables, x, c_noise, labels, train, rngs=None):
        c = c_noise[:, None, None, None]
        return jnp.sin(3.0 * c) * x + c**2


def test_trigflow_velocity_jvp_in_t():
    """With c_noise = t, d/dt of −F(x/σ_d, t) is −(3·cos(3t)·x/σ_d + 2t): jax.jvp gives it
    exactly and a central difference agrees, at both ends of [0, π/2]."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
    t = jnp.array([1e-3, 0.7, math.pi / 2 - 1e-3])
    fn = lambda tt: precond.trigflow_velocity(_Smooth(), {}, x, tt)
    _, tangent = jax.jvp(fn, (t,), (jnp.ones_like(t),))
    exact = -(
        3.0 * jnp.cos(3.0 * t)[:, None, None, None] * x / SIGMA_D + 2.0 * t[:, None, None, None]
    )
    np.testing.assert_allclose(tangent, exact, rtol=1e-5, atol=1e-6)
    h = 1e-3
    central = (fn(t + h) - fn(t - h)) / (2 * h)
    np.testing.assert_allclose(tangent, central, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The network with both options: forward, gradients and the JVP sCM needs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scm_network():
    model = NCSNpp(**SCM_ADN)
    x = _images(batch=2)
    variables = model.init(_key(3), x, jnp.array([0.1, 1.0]), train=False)
    return model, variables["params"], x


def test_scm_network_forward_gradients_and_jvp_at_both_ends(scm_network):
    model, params, x = scm_network
    t = jnp.array([1e-3, math.pi / 2 - 1e-3])
    vel = jax.jit(lambda p, xx, tt: precond.trigflow_velocity(model, p, xx, tt))

    out = vel(params, x, t)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.std(out)) > 1e-2  # init_scale=1: a live network

    grads = jax.jit(jax.grad(lambda p: jnp.mean(vel(p, x, t) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    adn_dense = grads["ResnetBlockBigGANpp_0"]["AdaptiveDoubleNorm_0"]["Dense_0"]["kernel"]
    assert float(jnp.max(jnp.abs(adn_dense))) > 0.0

    # sCM's tangent: a forward-mode JVP along (dx/dt, 1); here dx/dt = x. In t alone it must
    # match a central difference (the network is smooth in t through c_noise = t).
    tangents = (x, jnp.ones_like(t))
    jvp = jax.jit(
        lambda xx, tt, dx, dtt: jax.jvp(lambda a, b: vel(params, a, b), (xx, tt), (dx, dtt))
    )
    _, jvp_out = jvp(x, t, *tangents)
    assert bool(jnp.all(jnp.isfinite(jvp_out)))
    _, dt = jvp(x, t, jnp.zeros_like(x), jnp.ones_like(t))  # in t alone
    h = 5e-4
    central = (vel(params, x, t + h) - vel(params, x, t - h)) / (2 * h)
    for b in range(2):
        err = float(jnp.linalg.norm(dt[b] - central[b]) / jnp.linalg.norm(dt[b]))
        assert err < 1e-2, (b, err)  # 1.5e-3 measured
        assert float(jnp.linalg.norm(dt[b])) > 0.1  # the time input reaches the output (~7)


def test_scm_network_is_the_same_function_through_every_precond_path(scm_network):
    """With c_noise = t the EDM denoiser at σ = σ_d·tan(t) and TrigFlow's f = cos(t)·x_t −
    σ_d·sin(t)·F are one function: D(x_σ; σ) = f(cos(t)·x_σ, t)."""
    model, params, x = scm_network
    t = jnp.array([0.2, 1.3])
    sigma = SIGMA_D * jnp.tan(t)
    den = jax.jit(lambda xx, s: precond.edm_denoiser(model, params, xx, s))(x, sigma)
    cos, sin = (karras.per_example(v, x) for v in (jnp.cos(t), jnp.sin(t)))
    x_t = cos * x
    vel = jax.jit(lambda xx, tt: precond.trigflow_velocity(model, params, xx, tt))
    f = cos * x_t - SIGMA_D * sin * vel(x_t, t)
    np.testing.assert_allclose(den, f, rtol=1e-4, atol=1e-4)


def test_bad_option_values_raise():
    x, c = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,))
    for kwargs, match in [
        (dict(noise_conditioning="sigma"), "noise_conditioning='sigma'"),
        (dict(norm="layer"), "norm='layer'"),
    ]:
        with pytest.raises(ValueError, match=match):
            _shapes(NCSNpp(**SMALL, **kwargs), x, c)
    with pytest.raises(ValueError, match="needs the noise embedding"):
        layers.ResnetBlockBigGANpp(norm="adaptive_double").init(_key(0), jnp.zeros((1, 4, 4, 8)))
