"""Tests for the ADM U-Net (guided-diffusion UNetModel) of ImageNet 64 / LSUN 256."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ncsnpp import _inputs  # (x, the caller's c_noise) for a batch of random images

from cm_jax.models import adm
from cm_jax.models.adm import ADM

# The consistency-model ImageNet-64 network (ADM's defaults), counted by _hand_count below.
IN64_PARAMS = 295_899_267
# Published: EDM (Karras et al. 2022, arXiv 2206.00364, appendix) quotes its ADM ImageNet-64
# network at 295.9M parameters. The released CM ImageNet-64 networks agree: their float32
# weights on the Hugging Face hub (openai/diffusers-{cd,ct}_imagenet64*/unet/
# diffusion_pytorch_model.bin) are 1.18 GB = 4 bytes x ~296M.
PUBLISHED_IN64 = 295.90e6

# Two levels (16 and 8), attention at 8 with 16-channel heads (2 heads at 32, 4 at 64), a
# down and an up ResBlock, class labels: every path, small enough for a 2-core CPU.
TINY = dict(
    model_channels=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    num_head_channels=16,
    num_classes=10,
)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _hand_count(mc=192, t=768, in_ch=3, classes=1000) -> int:
    """ImageNet-64 ADM from the block definitions: widths 192, 384, 576, 768 at 64, 32, 16, 8;
    3 ResBlocks per level with attention at 32, 16, 8; scale-shift embedding projections."""
    gn = lambda c: 2 * c  # scale + bias
    conv = lambda k, i, o: k * k * i * o + o
    dense = lambda i, o: i * o + o

    def res(i, o):  # ResBlock i -> o channels
        n = gn(i) + conv(3, i, o) + dense(t, 2 * o) + gn(o) + conv(3, o, o)
        return n + (conv(1, i, o) if i != o else 0)

    attn = lambda c: gn(c) + conv(1, c, 3 * c) + conv(1, c, c)  # qkv + proj_out
    a, b, c, d = mc, 2 * mc, 3 * mc, 4 * mc
    embed = dense(mc, t) + dense(t, t) + classes * t
    inputs = (
        conv(3, in_ch, a)
        + 3 * res(a, a)
        + res(a, a)  # 64 (+ down)
        + res(a, b)
        + 2 * res(b, b)
        + 3 * attn(b)
        + res(b, b)  # 32 (+ down)
        + res(b, c)
        + 2 * res(c, c)
        + 3 * attn(c)
        + res(c, c)  # 16 (+ down)
        + res(c, d)
        + 2 * res(d, d)
        + 3 * attn(d)
    )  # 8
    middle = 2 * res(d, d) + attn(d)
    # Skips popped per level (last first): 8: d d d c | 16: c c c b | 32: b b b a | 64: a a a a
    outputs = (
        3 * res(d + d, d)
        + res(d + c, d)
        + 4 * attn(d)
        + res(d, d)  # + up
        + res(d + c, c)
        + 2 * res(c + c, c)
        + res(c + b, c)
        + 4 * attn(c)
        + res(c, c)
        + res(c + b, b)
        + 2 * res(b + b, b)
        + res(b + a, b)
        + 4 * attn(b)
        + res(b, b)
        + res(b + a, a)
        + 3 * res(a + a, a)
    )
    out = gn(a) + conv(3, a, in_ch)
    return embed + inputs + middle + outputs + out


def _key(seed):
    """'rbg' keys: same distributions, much faster to compile than threefry on CPU."""
    return jax.random.key(seed, impl="rbg")


def _noisy(tree, seed, scale=0.05):
    """Every leaf plus N(0, scale^2) noise: wakes up the zero-initialised layers. numpy noise:
    jax.random would compile a generator per leaf shape."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), tree)


def _shape_of(model, shape, labels=None):
    """init under eval_shape: runs every check and shape rule, allocates nothing."""
    return jax.eval_shape(
        lambda x, y: model.init(jax.random.key(0), x, jnp.zeros(shape[:1]), y, train=False),
        jax.ShapeDtypeStruct(shape, jnp.float32),
        labels,
    )


def _jitted(model):
    """(init, apply), each compiled whole: a few seconds on a CPU, several times less than
    flax's op-by-op eager execution of a fresh network."""
    return (
        jax.jit(model.init, static_argnames="train"),
        jax.jit(model.apply, static_argnames="train"),
    )


@pytest.fixture(scope="module")
def tiny():
    """The TINY network's jitted apply, fresh variables and a batch of 2 (dropout 0.1)."""
    init, apply = _jitted(ADM(**TINY))
    x, c_noise = _inputs()
    labels = jnp.array([0, 3])
    return apply, init(_key(1), x, c_noise, labels, train=False), x, c_noise, labels


# ---------------------------------------------------------------------------------------------
# 1. Parameter count of the ImageNet-64 config
# ---------------------------------------------------------------------------------------------


def test_imagenet64_parameter_count():
    variables = _shape_of(ADM(), (1, 64, 64, 3), jax.ShapeDtypeStruct((1,), jnp.int32))
    assert set(variables) == {"params"}
    n = _count(variables)
    assert n == _hand_count() == IN64_PARAMS
    assert abs(n - PUBLISHED_IN64) / PUBLISHED_IN64 < 0.002
    # Paths mirror the PyTorch state dict: 16 input and 16 output blocks, attention in slot 1.
    params = variables["params"]
    assert {f"input_blocks_{i}_0" for i in range(16)} <= set(params)
    assert {f"output_blocks_{i}_0" for i in range(16)} <= set(params)
    assert params["input_blocks_5_1"]["qkv"]["kernel"].shape == (1, 1, 384, 3 * 384)
    assert params["out_2"]["kernel"].shape == (3, 3, 192, 3)


# ---------------------------------------------------------------------------------------------
# 2. Zero output at init
# ---------------------------------------------------------------------------------------------


def test_fresh_network_outputs_exactly_zero(tiny):
    apply, variables, x, c_noise, labels = tiny
    assert _count(variables) < 1_000_000
    out = apply(variables, x, c_noise, labels, train=False)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0
    # The features entering the zero-initialised final conv are not zero: waking that conv
    # alone makes F non-zero.
    params = dict(variables["params"])
    params["out_2"] = _noisy(params["out_2"], seed=2)
    out = apply({"params": params}, x, c_noise, labels, train=False)
    assert out.shape == x.shape
    assert float(jnp.std(out)) > 1e-3


# ---------------------------------------------------------------------------------------------
# 3. Class conditioning
# ---------------------------------------------------------------------------------------------


def test_labels_change_output_and_are_validated(tiny):
    apply, variables, x, c_noise, _ = tiny
    variables = _noisy(variables, seed=3)
    a = apply(variables, x, c_noise, jnp.array([0, 7]), train=False)
    b = apply(variables, x, c_noise, jnp.array([5, 7]), train=False)
    diff = jnp.max(jnp.abs(a - b), axis=(1, 2, 3))
    assert float(diff[0]) > 1e-3  # label 0 -> 5 changes that example
    assert float(diff[1]) == 0.0  # the other example keeps its label and its output
    with pytest.raises(ValueError, match="labels is None"):
        apply(variables, x, c_noise, train=False)
    with pytest.raises(ValueError, match="labels must be integer"):
        apply(variables, x, c_noise, jnp.array([0.0, 1.0]), train=False)
    with pytest.raises(ValueError, match="labels given but num_classes=0"):
        _shape_of(ADM(**{**TINY, "num_classes": 0}), x.shape, jnp.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# 4. Dropout
# ---------------------------------------------------------------------------------------------


def test_dropout_only_in_train_mode(tiny):
    apply, variables, x, c_noise, labels = tiny
    variables = _noisy(variables, seed=4)
    train = lambda seed: apply(
        variables, x, c_noise, labels, train=True, rngs={"dropout": _key(seed)}
    )
    a, b = train(10), train(11)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    np.testing.assert_array_equal(np.asarray(a), np.asarray(train(10)))
    e1 = apply(variables, x, c_noise, labels, train=False)
    e2 = apply(variables, x, c_noise, labels, train=False, rngs={"dropout": _key(12)})
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    assert float(jnp.max(jnp.abs(e1 - a))) > 1e-3


# ---------------------------------------------------------------------------------------------
# 5. Timestep embedding
# ---------------------------------------------------------------------------------------------


def test_timestep_embedding_matches_guided_diffusion():
    """freqs exp(-ln(10000) i / half), [cos, sin] halves, a zero column for odd dims."""
    emb = np.asarray(adm.timestep_embedding(jnp.array([1.0, 250.0]), 4))
    np.testing.assert_allclose(
        emb[0], [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)], rtol=1e-6
    )
    np.testing.assert_allclose(
        emb[1], [math.cos(250.0), math.cos(2.5), math.sin(250.0), math.sin(2.5)], atol=1e-5
    )
    odd = np.asarray(adm.timestep_embedding(jnp.array([1.0]), 5))[0]
    np.testing.assert_allclose(
        odd, [math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01), 0.0], rtol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# 6. Resampling variants
# ---------------------------------------------------------------------------------------------


def test_resblock_updown_shapes(tiny):
    """TINY resamples with ResBlocks: input block 2 goes 16 -> 8, output block 1 ends 8 -> 16."""
    apply, variables, x, c_noise, labels = tiny
    params = variables["params"]
    assert params["input_blocks_2_0"]["in_layers_2"]["kernel"].shape == (3, 3, 32, 32)
    assert params["output_blocks_1_2"]["in_layers_2"]["kernel"].shape == (3, 3, 64, 64)
    out = apply(_noisy(variables, seed=6), x, c_noise, labels, train=False)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("conv_resample", [True, False])
def test_plain_resampling_runs(conv_resample):
    init, apply = _jitted(ADM(**TINY, resblock_updown=False, conv_resample=conv_resample))
    x, c_noise = _inputs()
    labels = jnp.array([2, 4])
    variables = _noisy(init(_key(1), x, c_noise, labels, train=False), seed=6)
    out = apply(variables, x, c_noise, labels, train=False)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    # Downsample.op / Upsample.conv, or no parameters at all without conv_resample.
    params = variables["params"]
    assert ("input_blocks_2_0" in params) == conv_resample
    assert ("output_blocks_1_2" in params) == conv_resample
    if conv_resample:
        assert params["input_blocks_2_0"]["op"]["kernel"].shape == (3, 3, 32, 32)
        assert params["output_blocks_1_2"]["conv"]["kernel"].shape == (3, 3, 64, 64)


def test_strided_conv_pads_like_pytorch():
    """padding=1 on both sides (PyTorch), not 'SAME' (0, 1): with an all-ones kernel on ones,
    the top-left output sees a 2x2 window and the bottom-right a full 3x3 one."""
    block = adm.Downsample(use_conv=True)
    x = jnp.ones((1, 8, 8, 1))
    variables = jax.tree.map(jnp.ones_like, block.init(jax.random.key(0), x))
    variables["params"]["op"]["bias"] = jnp.zeros((1,))
    out = np.asarray(block.apply(variables, x))[0, ..., 0]
    assert out.shape == (4, 4)
    assert out[0, 0] == 4.0 and out[-1, -1] == 9.0


# ---------------------------------------------------------------------------------------------
# 7. Mixed precision
# ---------------------------------------------------------------------------------------------


def test_bfloat16_compute_matches_float32(tiny):
    apply, variables, x, c_noise, labels = tiny
    variables = _noisy(variables, seed=7)
    bf16 = ADM(**TINY, dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shape_of(bf16, x.shape, labels)))
    ref = apply(variables, x, c_noise, labels, train=False)
    out = _jitted(bf16)[1](variables, x, c_noise, labels, train=False)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


# ---------------------------------------------------------------------------------------------
# 8. Configuration and input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, shape, match",
    [
        (
            dict(model_channels=48),
            (2, 16, 16, 3),
            "model_channels \\* ch_mult = 48 is not divisible",
        ),
        (
            dict(model_channels=16, ch_mult=(2, 3)),
            (2, 16, 16, 3),
            "ch_mult = 48 .*model_channels=16, ch_mult=\\(2, 3\\)",
        ),
        (dict(num_head_channels=24), (2, 16, 16, 3), "num_head_channels=24"),
        (dict(num_head_channels=-1, num_heads=3), (2, 16, 16, 3), "num_heads=3"),
        (dict(attn_resolutions=(4,)), (2, 16, 16, 3), "attn_resolutions entry 4 never occurs"),
        (dict(), (2, 15, 15, 3), "input resolution 15 is not divisible by 2"),
        (dict(ch_mult=(1, 1, 2)), (2, 18, 18, 3), "input resolution 18 is not divisible by 4"),
        (dict(), (2, 16, 8, 3), "must be square"),
        (dict(dtype="float64"), (2, 16, 16, 3), "dtype='float64'"),
        (dict(attention_impl="flash"), (2, 16, 16, 3), "attention_impl='flash'"),
    ],
)
def test_bad_config_or_input_raises(changes, shape, match):
    with pytest.raises(ValueError, match=match):
        _shape_of(ADM(**{**TINY, **changes}), shape, jnp.zeros(shape[:1], jnp.int32))


def test_bad_c_noise_shape_raises():
    model = ADM(**TINY)
    with pytest.raises(ValueError, match="c_noise must have shape"):
        jax.eval_shape(
            lambda: model.init(
                jax.random.key(0),
                jnp.zeros((2, 16, 16, 3)),
                jnp.zeros((1,)),
                jnp.zeros((2,), jnp.int32),
                train=False,
            )
        )


# ---------------------------------------------------------------------------------------------
# 9. Attention against a numpy reference
# ---------------------------------------------------------------------------------------------


def _numpy_attention(x, p, heads):
    """x + proj(softmax(q k^T / sqrt(d)) v) with q, k, v from GroupNorm(32) -> 1x1 conv, split
    the QKVAttentionLegacy way (per pixel: [head][q|k|v][d])."""
    t, c = x.shape
    d = c // heads
    g = x.reshape(t, 32, c // 32)
    g = (g - g.mean(axis=(0, 2))[None, :, None]) / np.sqrt(g.var(axis=(0, 2))[None, :, None] + 1e-5)
    xn = g.reshape(t, c) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = (xn @ p["qkv"]["kernel"][0, 0] + p["qkv"]["bias"]).reshape(t, heads, 3, d)
    out = np.empty((t, heads, d))
    for h in range(heads):
        q, k, v = qkv[:, h, 0], qkv[:, h, 1], qkv[:, h, 2]
        logits = q @ k.T / np.sqrt(d)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        out[:, h] = (w / w.sum(axis=1, keepdims=True)) @ v
    return x + out.reshape(t, c) @ p["proj_out"]["kernel"][0, 0] + p["proj_out"]["bias"]


def test_attention_block_matches_numpy_reference():
    block = adm.AttentionBlock(num_heads=4)
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 64))
    variables = block.init(jax.random.key(1), x)
    assert float(jnp.max(jnp.abs(block.apply(variables, x) - x))) == 0.0  # proj_out is zero
    variables = _noisy(variables, seed=9, scale=0.3)
    out = np.asarray(block.apply(variables, x), np.float64).reshape(16, 64)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables["params"])
    ref = _numpy_attention(np.asarray(x, np.float64).reshape(16, 64), params, heads=4)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert float(np.max(np.abs(ref - np.asarray(x).reshape(16, 64)))) > 0.1  # not a no-op


# ---------------------------------------------------------------------------------------------
# 10. ResBlock against a numpy reference
# ---------------------------------------------------------------------------------------------


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_group_norm(x, p):
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, 32, c // 32)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
    return g.reshape(x.shape) * p["scale"] + p["bias"]


def _np_conv(x, p):
    """Stride-1 convolution with PyTorch padding k // 2, as a sum of shifted matmuls."""
    k = p["kernel"]
    pad = k.shape[0] // 2
    xp = np.pad(x, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    h, w = x.shape[1:3]
    return (
        sum(
            xp[:, i : i + h, j : j + w] @ k[i, j]
            for i in range(k.shape[0])
            for j in range(k.shape[1])
        )
        + p["bias"]
    )


def _numpy_res_block(x, emb, p, scale_shift, up, down):
    """GN-SiLU-[resample both branches]-conv; FiLM GN(h)(1 + scale) + shift with [scale | shift]
    halves (or a bias before GN); SiLU-conv; 1x1 shortcut when the width changes."""

    def resample(v):
        if down:
            b, hh, ww, c = v.shape
            return v.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
        return v.repeat(2, axis=1).repeat(2, axis=2) if up else v

    h = resample(_np_silu(_np_group_norm(x, p["in_layers_0"])))
    x = resample(x)
    h = _np_conv(h, p["in_layers_2"])
    e = (_np_silu(emb) @ p["emb_layers_1"]["kernel"] + p["emb_layers_1"]["bias"])[:, None, None]
    if scale_shift:
        scale, shift = np.split(e, 2, axis=-1)
        h = _np_group_norm(h, p["out_layers_0"]) * (1 + scale) + shift
    else:
        h = _np_group_norm(h + e, p["out_layers_0"])
    h = _np_conv(_np_silu(h), p["out_layers_3"])
    return (_np_conv(x, p["skip_connection"]) if "skip_connection" in p else x) + h


@pytest.mark.parametrize(
    "out_ch, scale_shift, up, down, size", [(64, True, False, True, 2), (32, False, True, False, 8)]
)
def test_res_block_matches_numpy_reference(out_ch, scale_shift, up, down, size):
    """A widening down block with FiLM, and an up block with the additive embedding."""
    block = adm.ResBlock(out_ch, use_scale_shift_norm=scale_shift, up=up, down=down)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    emb = jax.random.normal(jax.random.key(1), (2, 16))
    variables = _noisy(block.init(jax.random.key(2), x, emb, False), seed=10, scale=0.3)
    out = np.asarray(block.apply(variables, x, emb, False), np.float64)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), variables["params"])
    ref = _numpy_res_block(
        np.asarray(x, np.float64), np.asarray(emb, np.float64), params, scale_shift, up, down
    )
    assert out.shape == ref.shape == (2, size, size, out_ch)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
