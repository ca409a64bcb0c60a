"""Tests for the NCSN++ network and its FIR resampling layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.models import layers
from cm_jax.models.ncsnpp import NCSNpp

FIR = (1, 3, 3, 1)

# The paper CIFAR-10 network (consistency_models_cifar10 configs/cifar10_ve_cd.py).
PAPER_PARAMS = 56_395_651  # derivation in _hand_count below

# Small enough to compile and run in seconds on a 2-core CPU, but exercising every path:
# two levels, a BigGAN down and up block, the residual input pyramid and attention at 8x8.
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _hand_count(nf=128, mult=2, in_ch=3) -> int:
    """NCSN++ parameter count from the block definitions (paper config: 3 levels of width
    C = nf * mult, 4 blocks per level, attention at 16x16, temb width T = 4 nf)."""
    c, t = nf * mult, 4 * nf
    gn = lambda ch: 2 * ch  # scale + bias
    conv = lambda k, i, o: k * k * i * o + o
    dense = lambda i, o: i * o + o
    attn = gn(c) + 4 * dense(c, c)  # q, k, v, out NIN projections

    def block(i, o, resample=False):  # BigGAN ResBlock
        n = gn(i) + conv(3, i, o) + dense(t, o) + gn(o) + conv(3, o, o)
        return n + (conv(1, i, o) if i != o or resample else 0)

    embed = nf + dense(2 * nf, t) + dense(t, t)  # Fourier W (frozen) + MLP
    encoder = (
        conv(3, in_ch, nf)
        + block(nf, c)
        + 3 * block(c, c)  # 32x32
        + block(c, c, True)
        + conv(3, in_ch, c)  # down + input-pyramid FIR conv
        + 4 * (block(c, c) + attn)  # 16x16
        + block(c, c, True)
        + conv(3, c, c)  # down + input-pyramid FIR conv
        + 4 * block(c, c)
    )  # 8x8
    middle = 2 * block(c, c) + attn
    decoder = (
        5 * block(2 * c, c)
        + block(c, c, True)  # 8x8 (+ up)
        + 5 * block(2 * c, c)
        + attn
        + block(c, c, True)  # 16x16 (+ up)
        + 4 * block(2 * c, c)
        + block(c + nf, c)
    )  # 32x32, last skip is conv_in
    head = gn(c) + conv(3, c, in_ch)
    return embed + encoder + middle + decoder + head


def _inputs(res=16, channels=3, batch=2, seed=0):
    kx, ks = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, res, res, channels))
    sigma = jnp.exp(jax.random.uniform(ks, (batch,), minval=-4.0, maxval=4.0))
    c_noise = 0.25 * jnp.log(sigma)  # what the caller passes (EDM / official CM code)
    return x, c_noise


def _key(seed):
    """An 'rbg' key: same initialiser distributions, but XLA's RngBitGenerator compiles in a
    fraction of the time threefry needs for ~100 parameter shapes (the test budget is CPU)."""
    return jax.random.key(seed, impl="rbg")


def _init(model, x, c_noise, labels=None):
    return model.init(_key(1), x, c_noise, labels, train=False)


def _apply_fn(model):
    """Apply; `rng` None means eval mode."""

    def apply(variables, x, c_noise, labels=None, rng=None):
        if rng is None:
            return model.apply(variables, x, c_noise, labels, train=False)
        return model.apply(variables, x, c_noise, labels, train=True, rngs={"dropout": rng})

    return apply


# ---------------------------------------------------------------------------------------------
# 1. Parameter count of the paper config
# ---------------------------------------------------------------------------------------------


def test_paper_config_parameter_count():
    model = NCSNpp()  # defaults are the paper CIFAR-10 config
    x, c_noise = (
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
    )
    variables = jax.eval_shape(
        lambda k, x, s: model.init(k, x, s, train=False), jax.random.key(0), x, c_noise
    )
    assert set(variables) == {"params"}  # no batch stats / mutable collections
    n = _count(variables)
    assert n == _hand_count() == PAPER_PARAMS == 56_395_651
    assert abs(n - 56.4e6) / 56.4e6 < 0.01  # locuslab/ect README: "56.4M"


# ---------------------------------------------------------------------------------------------
# 2. Tiny config: shapes, dtypes, dropout
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dropout():
    model = NCSNpp(**TINY, dropout=0.5, init_scale=1.0)
    x, c_noise = _inputs()
    return model, _init(model, x, c_noise), _apply_fn(model), x, c_noise


def test_tiny_forward_shapes_and_dtypes(tiny_dropout):
    model, variables, apply, x, c_noise = tiny_dropout
    assert _count(variables) < 1_000_000
    assert set(variables) == {"params"}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    for out in (apply(variables, x, c_noise), apply(variables, x, c_noise, rng=_key(0))):
        assert out.shape == x.shape
        assert out.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(out)))


def test_tiny_dropout_rngs(tiny_dropout):
    _, variables, apply, x, c_noise = tiny_dropout
    a = apply(variables, x, c_noise, rng=_key(10))
    b = apply(variables, x, c_noise, rng=_key(11))
    a2 = apply(variables, x, c_noise, rng=_key(10))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3  # different masks
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # same rng, same output
    # Eval mode: dropout off, deterministic, and different from any train-mode draw.
    e1, e2 = apply(variables, x, c_noise), apply(variables, x, c_noise)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    assert float(jnp.max(jnp.abs(e1 - a))) > 1e-3
    no_dropout = NCSNpp(**TINY, dropout=0.0, init_scale=1.0)
    np.testing.assert_array_equal(
        np.asarray(e1), np.asarray(_apply_fn(no_dropout)(variables, x, c_noise))
    )


def test_other_resolution_and_channels():
    """Any square resolution divisible by 2**(levels-1) and any channel count; also the DDPM
    block variant with input_skip / output_skip progressive paths."""
    model = NCSNpp(
        **TINY,
        resblock_type="ddpm",
        progressive="output_skip",
        progressive_input="input_skip",
        progressive_combine="cat",
        embedding_type="positional",
        init_scale=1.0,
    )
    x, c_noise = _inputs(res=12, channels=5, batch=1)
    variables = _init(model, x, c_noise)
    out = _apply_fn(model)(variables, x, c_noise)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


# ---------------------------------------------------------------------------------------------
# 3. init_scale = 0: F ~ 0 at init
# ---------------------------------------------------------------------------------------------


def test_zero_init_scale_output_is_near_zero():
    """score_sde's init_scale=0 means variance_scaling(1e-10, fan_avg, uniform) for the head
    conv (and the last conv of every residual branch), zero bias: F is ~1e-5, not exactly 0."""
    x, c_noise = _inputs()
    model = NCSNpp(**TINY)  # init_scale=0.0 default
    variables = _init(model, x, c_noise)
    head = variables["params"]["Conv_1"]  # Conv_0 is the input conv
    fan_avg = (9 * head["kernel"].shape[2] + 9 * head["kernel"].shape[3]) / 2
    limit = math.sqrt(3 * 1e-10 / fan_avg)
    assert 0 < float(jnp.max(jnp.abs(head["kernel"]))) <= limit
    assert float(jnp.max(jnp.abs(head["bias"]))) == 0.0
    # The same 1e-10 init closes every residual branch, so each block starts as its shortcut.
    params = variables["params"]
    tails = [params[name]["Conv_1"]["kernel"] for name in params if name.startswith("Resnet")]
    tails += [params[name]["NIN_3"]["W"] for name in params if name.startswith("AttnBlock")]
    assert len(tails) == 10 + 3  # TINY: 10 ResBlocks, 3 attention blocks
    assert max(float(jnp.max(jnp.abs(w))) for w in tails) < 1e-4
    out = _apply_fn(model)(variables, x, c_noise)
    assert 0 < float(jnp.max(jnp.abs(out))) < 1e-3
    # Sanity: with init_scale=1 the same network is O(1) at init.
    loud = NCSNpp(**TINY, init_scale=1.0)
    out1 = _apply_fn(loud)(_init(loud, x, c_noise), x, c_noise)
    assert float(jnp.std(out1)) > 0.05


# ---------------------------------------------------------------------------------------------
# 4. FIR resampling
# ---------------------------------------------------------------------------------------------


def test_fir_downsample_of_constant():
    """[1,3,3,1]/8 per axis sums to 1, so the interior stays constant. The border sees one
    zero-padded tap of weight 1/8: edges 7/8, corners (7/8)^2 = 49/64 (StyleGAN2 pads zeros)."""
    y = np.asarray(layers.downsample_2d(jnp.full((1, 8, 8, 2), 3.0), FIR))[0, ..., 0]
    expected = np.ones((4, 4))
    expected[[0, -1], :] *= 7 / 8
    expected[:, [0, -1]] *= 7 / 8
    np.testing.assert_allclose(y, 3.0 * expected, rtol=1e-6)


def test_fir_upsample_of_constant():
    """Upsampling: each output pixel is 3/4 of its nearest input and 1/4 of the next one per
    axis (interpolation at +-1/4), so the border loses 1/4: edges 3/4, corners 9/16."""
    y = np.asarray(layers.upsample_2d(jnp.ones((1, 4, 4, 1)), FIR))[0, ..., 0]
    expected = np.ones((8, 8))
    expected[[0, -1], :] *= 3 / 4
    expected[:, [0, -1]] *= 3 / 4
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_fir_down_of_up_recovers_affine_image():
    """Upsampling places samples at n -+ 1/4 by linear interpolation; the symmetric [1,3,3,1]
    downsampler averages the 4 samples at m -+ 1/4, m -+ 3/4 (centre m). Both are exact for
    affine images, so down(up(x)) == x away from the 1-pixel zero-padded border."""
    i = jnp.arange(12.0)
    ramp = (0.3 * i[:, None] - 0.2 * i[None, :] + 1.0)[None, :, :, None]
    y = layers.downsample_2d(layers.upsample_2d(ramp, FIR), FIR)
    assert y.shape == ramp.shape
    np.testing.assert_allclose(
        np.asarray(y)[0, 1:-1, 1:-1], np.asarray(ramp)[0, 1:-1, 1:-1], atol=1e-5
    )


def test_fused_fir_conv_equals_unfused_in_interior():
    """upsample_conv_2d == conv(upsample_2d(x)) and conv_downsample_2d == downsample_2d(conv(x))
    except on the 1-pixel border, where the fused op pads once instead of twice (StyleGAN2)."""
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
    conv = lambda v: jax.lax.conv_general_dilated(
        v, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    up = layers.upsample_conv_2d(x, w, FIR)
    np.testing.assert_allclose(
        np.asarray(up)[:, 1:-1, 1:-1],
        np.asarray(conv(layers.upsample_2d(x, FIR)))[:, 1:-1, 1:-1],
        atol=1e-4,
    )
    down = layers.conv_downsample_2d(x, w, FIR)
    np.testing.assert_allclose(
        np.asarray(down)[:, 1:-1, 1:-1],
        np.asarray(layers.downsample_2d(conv(x), FIR))[:, 1:-1, 1:-1],
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------------
# 5. Mixed precision
# ---------------------------------------------------------------------------------------------


def test_bfloat16_compute_matches_float32():
    x, c_noise = _inputs()
    f32 = NCSNpp(**TINY, init_scale=1.0)
    bf16 = NCSNpp(**TINY, init_scale=1.0, dtype="bfloat16")
    variables = _init(bf16, x, c_noise)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    ref = _apply_fn(f32)(variables, x, c_noise)
    out = _apply_fn(bf16)(variables, x, c_noise)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


# ---------------------------------------------------------------------------------------------
# 6. Class conditioning
# ---------------------------------------------------------------------------------------------


def test_class_conditional_labels_change_output():
    x, c_noise = _inputs()
    model = NCSNpp(**TINY, num_classes=10, init_scale=1.0)
    labels = jnp.array([1, 2])
    variables = _init(model, x, c_noise, labels)
    apply = _apply_fn(model)
    a = apply(variables, x, c_noise, labels)
    b = apply(variables, x, c_noise, jnp.array([3, 2]))
    diff = jnp.max(jnp.abs(a - b), axis=(1, 2, 3))
    assert float(diff[0]) > 1e-3  # changed label changes that example
    assert float(diff[1]) < 1e-5  # unchanged label leaves the other example alone
    with pytest.raises(ValueError, match="labels is None"):
        model.apply(variables, x, c_noise, train=False)


# ---------------------------------------------------------------------------------------------
# 7. Input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 30, 30, 3), "input resolution 30 is not divisible by 4 \\(ch_mult has 3 levels\\)"),
        ((1, 32, 16, 3), "must be square"),
        ((32, 32, 3), "must be \\[B, H, W, C\\]"),
    ],
)
def test_bad_input_shape_raises(shape, match):
    model = NCSNpp()
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(
            lambda x: model.init(jax.random.key(0), x, jnp.zeros((1,)), train=False),
            jax.ShapeDtypeStruct(shape, jnp.float32),
        )


def test_bad_options_raise():
    x, c_noise = _inputs()
    for kwargs, match in [
        (dict(progressive="bogus"), "progressive='bogus'"),
        (dict(dtype="float64"), "dtype='float64'"),
        (dict(noise_conditioning="sigma"), "noise_conditioning='sigma'"),
        (dict(norm="batch"), "norm='batch'"),
    ]:
        with pytest.raises(ValueError, match=match):
            NCSNpp(**TINY, **kwargs).init(jax.random.key(0), x, c_noise, train=False)
    with pytest.raises(ValueError, match="c_noise must have shape"):
        NCSNpp(**TINY).init(jax.random.key(0), x, c_noise[:1], train=False)
    with pytest.raises(ValueError, match="num_classes=0"):
        NCSNpp(**TINY).init(jax.random.key(0), x, c_noise, jnp.array([0, 1]), train=False)


@pytest.mark.parametrize(
    "up, down, pad", [(1, 2, (1, 1)), (2, 1, (2, 1)), (1, 1, (2, 1)), (1, 1, (-1, 2))]
)
def test_separable_fir_equals_the_depthwise_convolution(up, down, pad):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    k = layers.fir_kernel_2d([1, 3, 3, 1], gain=up**2)
    fast = layers.upfirdn2d(x, k, up=up, down=down, pad=pad)
    reference = layers._upfirdn2d_depthwise(x, k, up, down, pad)
    np.testing.assert_allclose(fast, reference, rtol=1e-6, atol=1e-6)
