"""Building blocks of NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

NCSN++ is the network the consistency-model paper (Song et al. 2023) uses on CIFAR-10. The
blocks follow the score_sde / consistency_models_cifar10 JAX code:

* FIR resampling with the [1, 3, 3, 1] binomial filter, as in StyleGAN2's ``upfirdn2d``
  (Karras et al. 2020), including the fused "upsample + conv" and "conv + downsample" variants.
* DDPM initialisation: ``variance_scaling(scale, "fan_avg", "uniform")`` with zero biases, and
  ``init_scale=0`` meaning 1e-10 (not exactly zero, so gradients still reach the weights) for the
  last layer of every residual branch and of the network.
* Gaussian Fourier projection of the noise level, BigGAN and DDPM residual blocks, single-head
  self-attention, and the ``Combine`` skip merger.

Module class names and creation order match the reference code, so the parameter tree has the
same paths (``ResnetBlockBigGANpp_3/Conv_1/kernel``, ``Conv2d_0/weight``, ...).

Mixed precision: every module takes ``dtype``, the compute dtype; parameters are always float32
and cast on use. GroupNorm statistics are always reduced in float32 (flax's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DType = Any
Array = jax.Array

_SQRT_HALF = 1.0 / math.sqrt(2.0)  # python float: stays weakly typed, so bf16 stays bf16
_NHWC = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------------------------
# Initialisation and plain convolutions
# ----------------------------------------------------------------------------------------------


def default_init(scale: float = 1.0) -> Callable:
    """DDPM initialiser. ``scale == 0`` becomes 1e-10: the layer starts as (almost) zero, so a
    residual branch starts as the identity, but its weights are not exactly zero."""
    scale = 1e-10 if scale == 0 else scale
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv3x3(
    features: int, init_scale: float = 1.0, stride: int = 1, dtype: DType = jnp.float32
) -> nn.Conv:
    """3x3 'SAME' convolution with DDPM init and zero bias."""
    return nn.Conv(
        features,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def conv1x1(features: int, init_scale: float = 1.0, dtype: DType = jnp.float32) -> nn.Conv:
    """1x1 convolution with DDPM init and zero bias."""
    return nn.Conv(
        features,
        kernel_size=(1, 1),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def dense(features: int, dtype: DType = jnp.float32) -> nn.Dense:
    """Dense layer with DDPM init (used for the noise-embedding MLP and per-block projections)."""
    return nn.Dense(features, kernel_init=default_init(), dtype=dtype, param_dtype=jnp.float32)


def group_norm(channels: int, dtype: DType = jnp.float32) -> nn.GroupNorm:
    """GroupNorm with min(C // 4, 32) groups, the NCSN++ rule (32 groups unless C < 128)."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(
            f"GroupNorm: {channels} channels cannot be split into min(C // 4, 32) = {groups} "
            "groups; choose nf * ch_mult so every feature width is a multiple of 4 and of "
            "min(C // 4, 32)"
        )
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)


PIXEL_NORM_EPS = 1e-8  # ProGAN's pixelnorm_epsilon (tkarras/progressive_growing_of_gans)


def pixel_norm(x: Array, eps: float = PIXEL_NORM_EPS) -> Array:
    """Pixel normalisation (Karras et al. 2018, ProGAN): x / √(mean(x²) + ε) over the last
    (channel) axis, so a vector leaves with unit RMS. Computed in float32, returned in x's dtype.
    Its derivative at x = 0 is 1/√ε: keep its inputs away from 0 (AdaptiveDoubleNorm does)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def skip_sum(x: Array, h: Array, skip_rescale: bool) -> Array:
    """Residual sum; with ``skip_rescale`` divided by sqrt(2) to keep unit variance (NCSN++)."""
    return (x + h) * _SQRT_HALF if skip_rescale else x + h


# ----------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 upfirdn2d)
# ----------------------------------------------------------------------------------------------


def fir_kernel_2d(kernel: Sequence[float], gain: float = 1.0) -> np.ndarray:
    """Separable 2-D FIR kernel from a 1-D one, normalised so a constant image keeps its value
    (times ``gain``). Static numpy, so it is a compile-time constant."""
    k = np.asarray(kernel, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / k.sum() * gain


def upfirdn2d(
    x: Array, kernel: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Array:
    """Upsample by zero insertion, zero-pad, FIR-filter, then keep every ``down``-th pixel.

    Same result as StyleGAN2's ``upfirdn_2d`` on NHWC input (``pad`` is applied to the zero-
    inserted image, before the ``up - 1`` trailing zeros after the last pixel are counted).
    A separable kernel (every FIR kernel built from a 1-D one) runs as two 1-D passes of shifted
    slices, which XLA fuses into elementwise work; a depthwise convolution is several times
    slower on CPUs. Other kernels take the depthwise convolution.
    """
    factors = _separable_factors(kernel)
    if factors is None:
        return _upfirdn2d_depthwise(x, kernel, up, down, pad)
    k_rows, k_cols = factors
    x = _upfirdn1d(x, k_rows, 1, up, down, pad)
    return _upfirdn1d(x, k_cols, 2, up, down, pad)


def _separable_factors(kernel: np.ndarray):
    """(column, row) vectors whose outer product is ``kernel``, or None if it has rank > 1."""
    u, s, vt = np.linalg.svd(np.asarray(kernel, np.float64))
    if s.size > 1 and s[1] > 1e-7 * s[0]:
        return None
    return u[:, 0] * np.sqrt(s[0]), vt[0] * np.sqrt(s[0])


def _upfirdn1d(
    x: Array, k: np.ndarray, axis: int, up: int, down: int, pad: tuple[int, int]
) -> Array:
    """upfirdn along one axis: zero insertion, padding, convolution with ``k``, decimation."""
    if up > 1:
        x = jnp.expand_dims(x, axis + 1)
        widths = [(0, 0)] * x.ndim
        widths[axis + 1] = (0, up - 1)
        x = jnp.pad(x, widths)
        shape = list(x.shape)
        x = x.reshape(shape[:axis] + [shape[axis] * up] + shape[axis + 2 :])
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1], 0)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    taps = np.asarray(k, np.float32)[::-1]  # upfirdn convolves: flip for a correlation
    length = x.shape[axis] - len(taps) + 1
    out = sum(
        float(t) * jax.lax.slice_in_dim(x, j, j + length, axis=axis)
        for j, t in enumerate(taps)
        if t != 0
    )
    if down > 1:
        out = jax.lax.slice_in_dim(out, 0, length, stride=down, axis=axis)
    return out


def _upfirdn2d_depthwise(
    x: Array, kernel: np.ndarray, up: int, down: int, pad: tuple[int, int]
) -> Array:
    """upfirdn2d as one depthwise convolution: ``lhs_dilation`` inserts the zeros and
    ``window_strides`` drops pixels."""
    channels = x.shape[-1]
    # upfirdn convolves (not correlates): flip the kernel for lax's cross-correlation.
    w = jnp.asarray(kernel[::-1, ::-1], dtype=x.dtype)
    w = jnp.tile(w[:, :, None, None], (1, 1, 1, channels))
    pad0, pad1 = pad
    padding = [(pad0, pad1 + up - 1)] * 2
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(down, down),
        padding=padding,
        lhs_dilation=(up, up),
        dimension_numbers=_NHWC,
        feature_group_count=channels,
    )


def upsample_2d(x: Array, kernel: Sequence[float], factor: int = 2) -> Array:
    """FIR upsampling by ``factor``; the kernel is scaled by factor**2 so constants stay constant
    (away from the zero-padded border)."""
    k = fir_kernel_2d(kernel, gain=factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, kernel: Sequence[float], factor: int = 2) -> Array:
    """FIR downsampling (anti-aliasing low-pass, then decimation) by ``factor``."""
    k = fir_kernel_2d(kernel)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Array, w: Array, kernel: Sequence[float], factor: int = 2) -> Array:
    """Fused ``upsample_2d`` then conv (StyleGAN2): a stride-``factor`` transposed convolution
    with ``w`` followed by one FIR pass, padding only once.

    The transposed convolution (TF ``conv2d_transpose`` with output size (H-1)*factor + kw) is
    written as a convolution over the zero-inserted input with full padding kw - 1.
    """
    kw = w.shape[0]
    k = fir_kernel_2d(kernel, gain=factor**2)
    p = (k.shape[0] - factor) - (kw - 1)
    x = jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=(1, 1),
        padding=[(kw - 1, kw - 1)] * 2,
        lhs_dilation=(factor, factor),
        dimension_numbers=_NHWC,
    )
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Array, w: Array, kernel: Sequence[float], factor: int = 2) -> Array:
    """Fused conv then ``downsample_2d`` (StyleGAN2): FIR-filter once with enough padding for
    both, then a stride-``factor`` 'VALID' convolution with ``w``."""
    kw = w.shape[0]
    k = fir_kernel_2d(kernel)
    p = (k.shape[0] - factor) + (kw - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(factor, factor), padding="VALID", dimension_numbers=_NHWC
    )


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling (used when ``fir=False``)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling (used when ``fir=False``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class Conv2d(nn.Module):
    """Convolution with optional fused FIR up/downsampling (StyleGAN2 ``Conv2d``).

    Parameters are ``weight`` (HWIO) and ``bias``, as in the reference, with DDPM init.
    """

    features: int
    kernel: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: Sequence[int] = (1, 3, 3, 1)
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up and self.down:
            raise ValueError("Conv2d: up and down are exclusive")
        if self.kernel < 1 or self.kernel % 2 != 1:
            raise ValueError(f"Conv2d: kernel must be odd and positive, got {self.kernel}")
        w = self.param(
            "weight",
            default_init(self.init_scale),
            (self.kernel, self.kernel, x.shape[-1], self.features),
            jnp.float32,
        )
        x, w = x.astype(self.dtype), w.astype(self.dtype)
        if self.up:
            x = upsample_conv_2d(x, w, self.resample_kernel)
        elif self.down:
            x = conv_downsample_2d(x, w, self.resample_kernel)
        else:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            x = x + b.astype(self.dtype)
        return x


class Upsample(nn.Module):
    """2x upsampling: FIR or nearest, with or without a (fused) 3x3 conv to ``out_ch``."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if self.fir:
            if self.with_conv:
                return Conv2d(
                    out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel, dtype=self.dtype
                )(x)
            return upsample_2d(x, self.fir_kernel)
        h = naive_upsample_2d(x)
        return conv3x3(out_ch, dtype=self.dtype)(h) if self.with_conv else h


class Downsample(nn.Module):
    """2x downsampling: FIR or average-pool / strided conv, optionally projecting to ``out_ch``."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if self.fir:
            if self.with_conv:
                return Conv2d(
                    out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel, dtype=self.dtype
                )(x)
            return downsample_2d(x, self.fir_kernel)
        if self.with_conv:
            return conv3x3(out_ch, stride=2, dtype=self.dtype)(x)
        return naive_downsample_2d(x)


# ----------------------------------------------------------------------------------------------
# Noise-level embeddings
# ----------------------------------------------------------------------------------------------


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2 pi W s), cos(2 pi W s)], W ~ N(0, scale^2) (Tancik et al.
    2020; NCSN++ uses scale 16 on the noise conditioning input).

    ``W`` is a parameter (as in the reference, so the parameter count includes it) but is never
    trained: gradients are stopped. Computed in float32: sin/cos of arguments of size ~100 would
    lose all precision in bfloat16.
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, s: Array) -> Array:
        w = self.param(
            "W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,), jnp.float32
        )
        w = jax.lax.stop_gradient(w)
        proj = s.astype(jnp.float32)[:, None] * w[None, :] * (2.0 * jnp.pi)
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def timestep_embedding(t: Array, dim: int, max_positions: int = 10000) -> Array:
    """Transformer sinusoidal embedding of a scalar per example (DDPM), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, [(0, 0), (0, dim % 2)])


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class NIN(nn.Module):
    """Per-pixel linear map ("network in network"), the DDPM 1x1 projection. The reference gives
    it a default init scale of 0.1 (q/k/v projections and the DDPM-block shortcut)."""

    num_units: int
    init_scale: float = 0.1
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param(
            "W", default_init(self.init_scale), (x.shape[-1], self.num_units), jnp.float32
        )
        b = self.param("b", nn.initializers.zeros, (self.num_units,), jnp.float32)
        x = x.astype(self.dtype)
        return jnp.tensordot(x, w.astype(self.dtype), axes=1) + b.astype(self.dtype)


class Combine(nn.Module):
    """Merge a skip input ``x`` into ``y``: project x to y's width by 1x1 conv, then sum or
    concatenate (progressive growing, NCSN++ ``input_skip``)."""

    method: str = "cat"
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        if self.method not in ("cat", "sum"):
            raise ValueError(f"Combine: method {self.method!r} is not 'cat' or 'sum'")
        h = conv1x1(y.shape[-1], dtype=self.dtype)(x)
        return jnp.concatenate([h, y], axis=-1) if self.method == "cat" else h + y


class AttnBlockpp(nn.Module):
    """Single-head self-attention over all pixels (DDPM, as modified by NCSN++).

    q, k, v are NIN projections of the group-normalised input, one head of width C, scaled by
    C**-0.5. Uses ``jax.nn.dot_product_attention`` so a GPU can pick a fused kernel
    (``attention_impl="cudnn"``); ``None`` lets JAX choose (the XLA path). The output projection
    starts near zero (``init_scale``), so the block starts as the identity.
    """

    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: DType = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = group_norm(c, self.dtype)(x)
        # [B, T, heads=1, C]: the layout dot_product_attention expects.
        q, k, v = (NIN(c, dtype=self.dtype)(h).reshape(b, height * width, 1, c) for _ in range(3))
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(h.reshape(b, height, width, c))
        return skip_sum(x.astype(h.dtype), h, self.skip_rescale)


NORMS = ("group", "adaptive_double")


class AdaptiveDoubleNorm(nn.Module):
    """sCM's adaptive double normalisation (Lu & Song 2025, §4.1):

        y = norm(x) ⊙ pnorm(s(t)) + pnorm(b(t)),

    norm the block's GroupNorm, pnorm `pixel_norm` over the channels, and s(t), b(t) AdaGN's
    scale and shift from the noise embedding. How each piece is read, and from where:

    * [s', b'] = Dense(2C)(act(temb)), split in two (scale first), as ADM's AdaGN
      (guided-diffusion ResBlock `emb_layers` = SiLU, Linear(2C); `models/adm.py` here).
    * s(t) = 1 + s': the paper writes AdaGN as y = norm(x) ⊙ s(t) + b(t), Dhariwal & Nichol's
      y_s·GroupNorm(h) + y_b, whose code computes y_s = 1 + scale; EDM2's block gain is likewise
      emb_linear(emb) + 1. The paper does not spell the offset out. With it, a zero Dense gives
      pnorm(1) = 1 and pnorm(0) = 0: the layer is then exactly the plain GroupNorm, and the
      scale never sits at pnorm's ill-conditioned 0 (gradient 1/√ε there).
    * norm(x) keeps GroupNorm's learned affine (γ, β), as ADM's and EDM's AdaGN do (their
      GroupNorm has weight and bias under the adaptive scale and shift). Paper silent.
    * The Dense starts like NCSN++'s other Dense layers (DDPM init, zero bias), not at zero:
      ADM's and EDM's AdaGN projections are not zero-initialised either, and a zero b' would
      sit at pnorm's 1/√ε gradient. Paper silent on initialisation.
    * pnorm's ε is ProGAN's 1e-8 (the paper cites pixel normalisation, Karras 2017); computed
      in float32. Paper silent on ε.
    """

    act: Callable = nn.swish
    eps: float = PIXEL_NORM_EPS
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Array) -> Array:
        c = x.shape[-1]
        h = group_norm(c, self.dtype)(x)
        scale, shift = jnp.split(dense(2 * c, self.dtype)(self.act(temb)), 2, axis=-1)
        scale = pixel_norm(1.0 + scale.astype(jnp.float32), self.eps)
        shift = pixel_norm(shift.astype(jnp.float32), self.eps)
        return h * scale.astype(h.dtype)[:, None, None, :] + shift.astype(h.dtype)[:, None, None, :]


def _conditioned_norm(h: Array, temb: Array | None, act: Callable, norm: str, dtype) -> Array:
    """Where the noise embedding enters a residual block, before its second activation.
    "group": NCSN++'s bias Dense(act(temb)) added, then GroupNorm (creates Dense_0 and the
    block's second GroupNorm, in the reference order). "adaptive_double": sCM's
    AdaptiveDoubleNorm in place of both; its shift replaces the additive bias, as AdaGN's does
    in ADM (`use_scale_shift_norm`) and in EDM's UNetBlock (`adaptive_scale`)."""
    if norm == "group":
        h = _add_temb(h, temb, act, dtype)
        return group_norm(h.shape[-1], dtype)(h)
    if norm != "adaptive_double":
        raise ValueError(f"norm={norm!r} is not one of {NORMS}")
    if temb is None:
        raise ValueError("norm='adaptive_double' needs the noise embedding temb")
    return AdaptiveDoubleNorm(act=act, dtype=dtype)(h, temb)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block: GN-act-conv, + Dense(temb) bias, GN-act-dropout-conv(init ~0).
    The shortcut is a NIN (or 3x3 conv) only when the width changes. ``norm`` is how the noise
    embedding enters (`_conditioned_norm`)."""

    act: Callable = nn.swish
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: DType = jnp.float32
    norm: str = "group"  # "group" | "adaptive_double"

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = True) -> Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(c, self.dtype)(x))
        h = conv3x3(out_ch, dtype=self.dtype)(h)
        h = self.act(_conditioned_norm(h, temb, self.act, self.norm, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
        if c != out_ch:
            x = (
                conv3x3(out_ch, dtype=self.dtype)(x)
                if self.conv_shortcut
                else NIN(out_ch, dtype=self.dtype)(x)
            )
        return skip_sum(x.astype(h.dtype), h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block (Brock et al. 2019) as used by NCSN++.

    Resampling happens inside the block, after the first GN-act, on both the residual branch and
    the shortcut; the shortcut gets a 1x1 conv whenever the width or resolution changes.
    ``norm`` is how the noise embedding enters (`_conditioned_norm`): only the block's second
    GroupNorm is time-conditioned, so only it can become sCM's adaptive double normalisation.
    """

    act: Callable = nn.swish
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: DType = jnp.float32
    norm: str = "group"  # "group" | "adaptive_double"

    def _resample(self, x: Array) -> Array:
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else naive_upsample_2d(x)
        if self.down:
            return downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(self, x: Array, temb: Array | None = None, train: bool = True) -> Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = self.act(group_norm(c, self.dtype)(x))
        h, x = self._resample(h), self._resample(x.astype(h.dtype))
        h = conv3x3(out_ch, dtype=self.dtype)(h)
        h = self.act(_conditioned_norm(h, temb, self.act, self.norm, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
        if c != out_ch or self.up or self.down:
            x = conv1x1(out_ch, dtype=self.dtype)(x)
        return skip_sum(x, h, self.skip_rescale)


def _add_temb(h: Array, temb: Array | None, act: Callable, dtype: DType) -> Array:
    """Add a per-channel bias from the noise embedding (DDPM conditioning). Must be called from
    a compact method: it creates the block's ``Dense_0``."""
    if temb is None:
        return h
    return h + dense(h.shape[-1], dtype)(act(temb))[:, None, None, :]
