"""ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), the U-Net of
openai/guided-diffusion that the consistency-model paper (Song et al. 2023) uses for ImageNet 64
and LSUN 256 (openai/consistency_models ``cm/unet.py``, ``UNetModel`` with learn_sigma off).

Layout (ImageNet-64 config: model_channels=192, ch_mult=(1, 2, 3, 4), 3 blocks per level,
attention at 32, 16 and 8 with 64-channel heads, scale-shift norm, resblock up/down):

    sinusoid(1000 c_noise) -> Dense -> SiLU -> Dense (+ Embed(label))     embedding emb, 4 mc
    conv3x3 -> [3 x ResBlock (+Attn)] -> ResBlock(down) per level          input blocks, every
                                                                           output kept as a skip
    ResBlock, Attn, ResBlock                                               middle block
    [4 x ResBlock(concat skip) (+Attn)] -> ResBlock(up) per level          output blocks
    GroupNorm -> SiLU -> conv3x3 (zero init)                               out

Every ResBlock closes its residual branch with a zero-initialised conv and every attention block
with a zero-initialised projection (guided-diffusion's ``zero_module``), and so does the final
conv: a freshly initialised network outputs exactly zero.

Parameter names mirror the PyTorch state dict, so converting a released checkpoint is a rename
plus a transpose: flax ``input_blocks_1_0/in_layers_2/kernel`` is torch
``input_blocks.1.0.in_layers.2.weight`` (OIHW -> HWIO); GroupNorm ``scale`` is torch ``weight``.

Mixed precision: ``dtype`` is the compute dtype of the input, middle and output blocks; parameters
are always float32. As in guided-diffusion (which converts only those blocks to fp16), GroupNorm,
the embedding MLP, the per-block embedding projections and the final layers run in float32.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax.models import checks, layers

Array = jax.Array
DType = Any

_DTYPES = ("float32", "bfloat16", "float16")
_GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels)

# PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
# Biases start at zero (PyTorch draws them from the same uniform; nothing depends on it).
_torch_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """guided-diffusion's sinusoidal embedding: [cos(t f_i), sin(t f_i)] with
    f_i = max_period**(-i / half), i < half = dim // 2, zero-padded to odd ``dim``; float32.

    Not ``layers.timestep_embedding`` (the DDPM one): that puts sin first and divides the
    exponent by half - 1, so the released ADM weights would see different features."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, [(0, 0), (0, dim % 2)])


def _conv(
    features: int, kernel: int, dtype: DType, name: str, stride: int = 1, zero: bool = False
) -> nn.Conv:
    """Conv with PyTorch's symmetric ``padding=kernel // 2``. Not 'SAME': for the stride-2
    downsampling conv 'SAME' pads (0, 1) where PyTorch pads (1, 1), shifting the sampling grid."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_init=nn.initializers.zeros if zero else _torch_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _dense(features: int, name: str) -> nn.Dense:
    """Float32 dense layer (the embedding MLP and the per-block embedding projections)."""
    return nn.Dense(
        features,
        kernel_init=_torch_init,
        bias_init=nn.initializers.zeros,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name=name,
    )


def _group_norm(x: Array, name: str) -> Array:
    """GroupNorm32: 32 groups, eps 1e-5, statistics and affine in float32, result cast back to
    the input dtype. Call from a compact method (it creates the module ``name``)."""
    h = nn.GroupNorm(
        num_groups=_GROUPS, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32, name=name
    )(x.astype(jnp.float32))
    return h.astype(x.dtype)


class ResBlock(nn.Module):
    """guided-diffusion ResBlock: GN-SiLU-[resample]-conv, embedding conditioning (FiLM
    ``GN(h) * (1 + scale) + shift`` with ``use_scale_shift_norm``, else a bias added before GN),
    SiLU-dropout-conv (zero init); shortcut identity, or a 1x1 conv when the width changes.
    ``up``/``down`` resample both branches (nearest x2 / 2x2 average pool, no conv)."""

    out_ch: int
    use_scale_shift_norm: bool = True
    up: bool = False
    down: bool = False
    dropout: float = 0.0
    dtype: DType = jnp.float32

    def _resample(self, x: Array) -> Array:
        if self.up:
            return layers.naive_upsample_2d(x)
        if self.down:
            return layers.naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(self, x: Array, emb: Array, train: bool) -> Array:
        h = nn.silu(_group_norm(x, "in_layers_0"))
        h, x = self._resample(h), self._resample(x)
        h = _conv(self.out_ch, 3, self.dtype, "in_layers_2")(h)
        width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        emb_out = _dense(width, "emb_layers_1")(nn.silu(emb)).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = _group_norm(h, "out_layers_0") * (1 + scale) + shift
        else:
            h = _group_norm(h + emb_out, "out_layers_0")
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
        h = _conv(self.out_ch, 3, self.dtype, "out_layers_3", zero=True)(h)
        if x.shape[-1] != self.out_ch:
            x = _conv(self.out_ch, 1, self.dtype, "skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels: GN, 1x1 conv to q|k|v, softmax(q k^T / sqrt(d))
    v per head (softmax in float32), zero-initialised 1x1 output projection, residual sum.

    qkv channels are split as guided-diffusion's default ``QKVAttentionLegacy`` does: heads
    first, then (q, k, v), i.e. channel = (head * 3 + {0,1,2}) * head_dim + i. Note that
    openai/consistency_models' ``UNetModel`` leaves AttentionBlock at its default
    ``attention_type="flash"``, whose ``QKVFlashAttention`` reads the order (q/k/v, head, i)
    instead: converting its released checkpoints needs that permutation of the qkv output
    channels (guided-diffusion checkpoints need none)."""

    num_heads: int
    dtype: DType = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        qkv = _conv(3 * c, 1, self.dtype, "qkv")(_group_norm(x, "norm"))
        qkv = qkv.reshape(b, height * width, self.num_heads, 3, c // self.num_heads)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # [B, T, heads, d] each
        # Default scale 1/sqrt(d); guided-diffusion scales q and k by d**-0.25 each to keep fp16
        # logits in range, which the float32 logits here do not need.
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        h = _conv(c, 1, self.dtype, "proj_out", zero=True)(h.reshape(b, height, width, c))
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``use_conv``) or 2x2 average pooling; keeps the width."""

    use_conv: bool = True
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.use_conv:
            return _conv(x.shape[-1], 3, self.dtype, "op", stride=2)(x)
        return layers.naive_downsample_2d(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv if ``use_conv``; keeps the width."""

    use_conv: bool = True
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = layers.naive_upsample_2d(x)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(h) if self.use_conv else h


def _names(prefix: str) -> Iterator[str]:
    """prefix_0, prefix_1, ...: the positions inside one of guided-diffusion's
    TimestepEmbedSequential blocks, so parameter paths match the PyTorch state dict."""
    return (f"{prefix}_{j}" for j in itertools.count())


class ADM(nn.Module):
    """ADM noise-conditional network F(x, c_noise, labels) (the raw network; preconditioning with
    c_skip / c_out / c_in lives in the caller). Only has a 'params' collection.

    Defaults are the consistency-model ImageNet-64 network. ``attn_resolutions`` are spatial
    sizes of the feature maps (guided-diffusion takes image_size // resolution). The timestep fed
    to the sinusoidal embedding is ``noise_scale * c_noise``: with the caller's c_noise =
    0.25 ln(sigma) that is openai/consistency_models' 1000 * 0.25 * ln(sigma + 1e-44) (the 1e-44
    is below float32 resolution for any sigma the samplers use)."""

    model_channels: int = 192
    ch_mult: Sequence[int] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    num_head_channels: int = 64  # -1: use num_heads heads of width C // num_heads
    num_heads: int = 4
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True  # Down/Upsample with a conv (when resblock_updown is off)
    dropout: float = 0.1
    num_classes: int = 1000  # 0: unconditional
    noise_scale: float = 1000.0
    dtype: str = "float32"  # compute dtype; params stay float32
    attention_impl: str | None = None  # jax.nn.dot_product_attention(implementation=...)

    @nn.compact
    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, train: bool
    ) -> Array:
        """x: [B, H, W, C] (already scaled by c_in); c_noise: [B]; labels: [B] int or None.
        Returns F with x's shape, in float32. Dropout draws from the 'dropout' rng when
        ``train`` is True."""
        self._check_config()
        x, c_noise = jnp.asarray(x), jnp.asarray(c_noise)
        labels = None if labels is None else jnp.asarray(labels)
        self._check_inputs(x, c_noise, labels)
        dtype = jnp.dtype(self.dtype)
        emb = self._embed(c_noise, labels)
        hs = self._input_blocks(x.astype(dtype), emb, train, dtype)
        h = self._middle_block(hs[-1], emb, train, dtype)
        h = self._output_blocks(h, hs, emb, train, dtype)
        return self._out(h, x.shape[-1])

    # -- validation --------------------------------------------------------------------------

    def _widths(self) -> list[int]:
        return [self.model_channels * m for m in self.ch_mult]

    def _check_config(self) -> None:
        options = {
            "dtype": (self.dtype, _DTYPES),
            "attention_impl": (self.attention_impl, (None, "xla", "cudnn")),
        }
        for name, (value, allowed) in options.items():
            if value not in allowed:
                raise ValueError(f"ADM: {name}={value!r} is not one of {allowed}")
        if (
            self.model_channels < 1
            or self.num_res_blocks < 1
            or not self.ch_mult
            or min(self.ch_mult) < 1
        ):
            raise ValueError(
                "ADM: need model_channels >= 1, num_res_blocks >= 1 and a "
                f"non-empty ch_mult of positive ints, got ch_mult={self.ch_mult}"
            )
        for width in self._widths():
            if width % _GROUPS:
                raise ValueError(
                    f"ADM: model_channels * ch_mult = {width} is not divisible by the {_GROUPS} "
                    f"GroupNorm groups (model_channels={self.model_channels}, "
                    f"ch_mult={tuple(self.ch_mult)})"
                )
        if self.num_head_channels == -1 and self.num_heads < 1:
            raise ValueError(f"ADM: num_heads={self.num_heads} must be >= 1")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise ValueError(f"ADM: num_head_channels={self.num_head_channels} must be >= 1 or -1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ADM: dropout={self.dropout} is not in [0, 1)")

    def _check_inputs(self, x: Array, c_noise: Array, labels: Array | None) -> None:
        checks.check_network_inputs("ADM", x, c_noise, labels, self.num_classes, len(self.ch_mult))
        self._check_attention(x.shape[1])

    def _check_attention(self, resolution: int) -> None:
        """Every attention resolution must occur, and every width that gets attention (those
        levels and the middle block) must split into whole heads."""
        sizes = [resolution >> level for level in range(len(self.ch_mult))]
        for res in self.attn_resolutions:
            if res not in sizes:
                raise ValueError(
                    f"ADM: attn_resolutions entry {res} never occurs: the feature maps of a "
                    f"{resolution}x{resolution} input are {sizes}"
                )
        levels = [lvl for lvl, size in enumerate(sizes) if size in self.attn_resolutions]
        for width in {self._widths()[lvl] for lvl in levels + [len(sizes) - 1]}:
            if self.num_head_channels != -1 and width % self.num_head_channels:
                raise ValueError(
                    f"ADM: attention width {width} is not divisible by "
                    f"num_head_channels={self.num_head_channels}"
                )
            if self.num_head_channels == -1 and width % self.num_heads:
                raise ValueError(
                    f"ADM: attention width {width} is not divisible by num_heads={self.num_heads}"
                )

    # -- block factories ----------------------------------------------------------------------

    def _res_block(self, dtype, out_ch: int, name: str, **kwargs) -> ResBlock:
        return ResBlock(
            out_ch,
            use_scale_shift_norm=self.use_scale_shift_norm,
            dropout=self.dropout,
            dtype=dtype,
            name=name,
            **kwargs,
        )

    def _attention(self, dtype, width: int, name: str) -> AttentionBlock:
        heads = self.num_heads if self.num_head_channels == -1 else width // self.num_head_channels
        return AttentionBlock(heads, dtype=dtype, attention_impl=self.attention_impl, name=name)

    # -- network stages ------------------------------------------------------------------------

    def _embed(self, c_noise: Array, labels: Array | None) -> Array:
        """Timestep embedding MLP (+ class embedding, added after the MLP), float32."""
        width = 4 * self.model_channels
        emb = timestep_embedding(self.noise_scale * c_noise, self.model_channels)
        emb = _dense(width, "time_embed_2")(nn.silu(_dense(width, "time_embed_0")(emb)))
        if self.num_classes > 0:
            # PyTorch nn.Embedding's N(0, 1) init.
            emb = emb + nn.Embed(
                self.num_classes,
                width,
                embedding_init=nn.initializers.normal(stddev=1.0),
                param_dtype=jnp.float32,
                name="label_emb",
            )(labels)
        return emb

    def _input_blocks(self, x: Array, emb: Array, train: bool, dtype) -> list[Array]:
        """Downsampling path; returns every block's output (the skips of the output blocks)."""
        hs = [_conv(self._widths()[0], 3, dtype, "input_blocks_0_0")(x)]
        index = itertools.count(1)
        last = len(self.ch_mult) - 1
        for level, width in enumerate(self._widths()):
            for _ in range(self.num_res_blocks):
                names = _names(f"input_blocks_{next(index)}")
                h = self._res_block(dtype, width, next(names))(hs[-1], emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attention(dtype, width, next(names))(h)
                hs.append(h)
            if level != last:
                name = f"input_blocks_{next(index)}_0"
                if self.resblock_updown:
                    h = self._res_block(dtype, width, name, down=True)(hs[-1], emb, train)
                else:
                    h = Downsample(self.conv_resample, dtype=dtype, name=name)(hs[-1])
                hs.append(h)
        return hs

    def _middle_block(self, h: Array, emb: Array, train: bool, dtype) -> Array:
        width = h.shape[-1]
        h = self._res_block(dtype, width, "middle_block_0")(h, emb, train)
        h = self._attention(dtype, width, "middle_block_1")(h)
        return self._res_block(dtype, width, "middle_block_2")(h, emb, train)

    def _output_blocks(self, h: Array, hs: list[Array], emb: Array, train: bool, dtype) -> Array:
        """Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip; the last
        block of every level but the first also upsamples."""
        hs = list(hs)
        index = itertools.count()
        for level in reversed(range(len(self.ch_mult))):
            width = self._widths()[level]
            for i in range(self.num_res_blocks + 1):
                names = _names(f"output_blocks_{next(index)}")
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self._res_block(dtype, width, next(names))(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attention(dtype, width, next(names))(h)
                if level and i == self.num_res_blocks:
                    h = self._upsample(h, emb, train, dtype, next(names))
        assert not hs, "every input-block skip must be consumed"
        return h

    def _upsample(self, h: Array, emb: Array, train: bool, dtype, name: str) -> Array:
        if self.resblock_updown:
            return self._res_block(dtype, h.shape[-1], name, up=True)(h, emb, train)
        return Upsample(self.conv_resample, dtype=dtype, name=name)(h)

    def _out(self, h: Array, out_channels: int) -> Array:
        """GN -> SiLU -> zero-initialised conv3x3, in float32 (guided-diffusion keeps this
        layer in float32 too; it sets the precision of the returned F)."""
        h = nn.silu(_group_norm(h.astype(jnp.float32), "out_0"))
        return _conv(out_channels, 3, jnp.float32, "out_2", zero=True)(h)
