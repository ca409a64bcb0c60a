"""NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H), the U-Net
the consistency-model paper (Song et al. 2023) trains on CIFAR-10.

Layout (paper config, 32x32, nf=128, ch_mult=(2, 2, 2), 4 blocks per level, attention at 16x16):

    Fourier(c_noise) -> Dense -> swish -> Dense                          noise embedding temb
    conv3x3 -> [4 x ResBlock (+Attn at 16)] -> ResBlock(down) per level  encoder, skips kept
              with a FIR-downsampled copy of the input added at each new level
              ("progressive_input='residual'")
    ResBlock, Attn, ResBlock                                             middle
    [5 x ResBlock(concat skip)] (+Attn at 16) -> ResBlock(up) per level  decoder
    GroupNorm -> swish -> conv3x3 (init ~0)                              head

The code follows the reference (yang-song/score_sde, openai/consistency_models_cifar10) block
for block and creates modules in the same order, so parameter paths and the parameter count
(56,395,651 for the paper config, the "56.4M" quoted by locuslab/ect) match it exactly.

Two options take the network toward sCM's CIFAR-10 network (Lu & Song 2025, §4.1 and App. G.1:
"TrigFlow parameterization, positional time embedding and adaptive double normalization"); their
defaults leave it exactly as above:

* ``noise_conditioning="trigflow_t"``: the network is fed c_noise = t = arctan(σ/σ_d) instead of
  EDM's ¼·ln σ. The module only records the choice; precond.py reads it and computes c_noise, so
  every denoiser, consistency function, TrigFlow velocity, sampler and editor agrees. t goes
  into the time embedding unscaled: with ``embedding_type="positional"`` (frequencies 1 down to
  1/10000, DDPM's and EDM's DDPM++'s) that is the paper's choice ("we use positional embeddings,
  which amounts to s ≈ 0.02 in Fourier embeddings": the mean |frequency| of the 64 positional
  ones, 0.115, equals 2π·s·E|ω| for ω ~ N(0, 1) at s = 0.023; t·1000 would be s ≈ 23, beyond the
  scale 16 its Figure 4 shows unstable). NVlabs/FastGen does not implement c_noise = t (its sCM
  wraps EDM networks fed ¼·ln σ), so it offers nothing to follow here.
* ``norm="adaptive_double"``: the time-conditioned GroupNorm of every residual block becomes
  sCM's adaptive double normalisation (layers.AdaptiveDoubleNorm, where each reading of the
  paper and its source is listed). The attention blocks' and the head's GroupNorms see no time
  input, so they stay: the paper does not say which norms it replaces, but defines the layer as
  a change to AdaGN, the norm that takes s(t) and b(t).

The paper's CIFAR-10 network is otherwise EDM's DDPM++ (App. G.1: "based on the Score SDE ...
architecture (DDPM++)", "the same settings of EDM"): here fir=False, progressive_input="none",
embedding_type="positional".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm_jax import karras
from cm_jax.models import checks, layers

Array = jax.Array

_DTYPES = ("float32", "bfloat16", "float16")


class NCSNpp(nn.Module):
    """NCSN++ noise-conditional network F(x, c_noise) (the raw network; preconditioning with
    c_skip / c_out / c_in lives in the caller). Only has a 'params' collection."""

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    resblock_type: str = "biggan"  # or "ddpm"
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resamp_with_conv: bool = True
    progressive: str = "none"  # "none" | "output_skip" | "residual"
    progressive_input: str = "residual"  # "none" | "input_skip" | "residual"
    progressive_combine: str = "sum"  # "sum" | "cat"
    embedding_type: str = "fourier"  # "fourier" | "positional"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    num_classes: int = 0  # >0: class-conditional
    dtype: str = "float32"  # compute dtype; params stay float32
    attention_impl: str | None = None  # jax.nn.dot_product_attention(implementation=...)
    # c_noise the caller feeds (precond.py): "log_sigma" = ¼·ln σ (EDM) | "trigflow_t" = t
    # = arctan(σ/σ_d) (sCM). The network itself only embeds whatever c_noise it is given.
    noise_conditioning: str = "log_sigma"
    norm: str = "group"  # residual blocks' time-conditioned norm: "group" | "adaptive_double"

    @nn.compact
    def __call__(
        self, x: Array, c_noise: Array, labels: Array | None = None, *, train: bool
    ) -> Array:
        """x: [B, H, W, C] (already scaled by c_in); c_noise: [B] (the caller passes
        0.25 * ln(sigma), or arctan(sigma / sigma_data) with noise_conditioning="trigflow_t");
        labels: [B] int or None. Returns F with x's shape, in float32.
        Dropout draws from the 'dropout' rng when ``train`` is True."""
        self._check_config()
        x, c_noise = jnp.asarray(x), jnp.asarray(c_noise)
        labels = None if labels is None else jnp.asarray(labels)
        self._check_inputs(x, c_noise, labels)
        dtype = jnp.dtype(self.dtype)
        temb = self._embed_noise(c_noise, labels, dtype)
        x = x.astype(dtype)
        hs = self._encoder(x, temb, train, dtype)
        h = self._middle(hs[-1], temb, train, dtype)
        h, pyramid = self._decoder(h, hs, temb, train, dtype, x.shape[-1])
        return self._head(h, pyramid, x.shape[-1])

    # -- validation --------------------------------------------------------------------------

    def _check_config(self) -> None:
        options = {
            "resblock_type": (self.resblock_type, ("biggan", "ddpm")),
            "progressive": (self.progressive, ("none", "output_skip", "residual")),
            "progressive_input": (self.progressive_input, ("none", "input_skip", "residual")),
            "progressive_combine": (self.progressive_combine, ("sum", "cat")),
            "embedding_type": (self.embedding_type, ("fourier", "positional")),
            "dtype": (self.dtype, _DTYPES),
            "attention_impl": (self.attention_impl, (None, "xla", "cudnn")),
            "noise_conditioning": (self.noise_conditioning, karras.NOISE_CONDITIONINGS),
            "norm": (self.norm, layers.NORMS),
        }
        for name, (value, allowed) in options.items():
            if value not in allowed:
                raise ValueError(f"NCSNpp: {name}={value!r} is not one of {allowed}")
        if len(self.ch_mult) < 1 or self.num_res_blocks < 1 or self.nf < 1:
            raise ValueError("NCSNpp: need nf >= 1, num_res_blocks >= 1 and a non-empty ch_mult")

    def _check_inputs(self, x: Array, c_noise: Array, labels: Array | None) -> None:
        checks.check_network_inputs(
            "NCSNpp", x, c_noise, labels, self.num_classes, len(self.ch_mult)
        )

    # -- block factories (partial modules, as in the reference) -----------------------------

    def _resnet_block(self, dtype) -> Callable[..., nn.Module]:
        common = dict(
            act=nn.swish,
            dropout=self.dropout,
            init_scale=self.init_scale,
            skip_rescale=self.skip_rescale,
            dtype=dtype,
            norm=self.norm,
        )
        if self.resblock_type == "ddpm":
            return functools.partial(layers.ResnetBlockDDPMpp, **common)
        return functools.partial(
            layers.ResnetBlockBigGANpp, fir=self.fir, fir_kernel=tuple(self.fir_kernel), **common
        )

    def _attn_block(self, dtype) -> Callable[..., nn.Module]:
        return functools.partial(
            layers.AttnBlockpp,
            init_scale=self.init_scale,
            skip_rescale=self.skip_rescale,
            dtype=dtype,
            attention_impl=self.attention_impl,
        )

    def _resample(self, cls, dtype, with_conv: bool, out_ch=None) -> nn.Module:
        return cls(
            out_ch=out_ch,
            with_conv=with_conv,
            fir=self.fir,
            fir_kernel=tuple(self.fir_kernel),
            dtype=dtype,
        )

    # -- network stages ------------------------------------------------------------------------

    def _embed_noise(self, c_noise: Array, labels: Array | None, dtype) -> Array:
        """Noise embedding: Fourier (or sinusoidal) features -> 2-layer MLP to 4 nf channels.
        The class embedding (if any) is added to the features before the MLP, as in EDM's
        SongUNet, so the MLP can mix noise level and class."""
        if self.embedding_type == "fourier":
            emb = layers.GaussianFourierProjection(
                embedding_size=self.nf, scale=self.fourier_scale
            )(c_noise)
        else:
            emb = layers.timestep_embedding(c_noise, self.nf)
        if self.num_classes > 0:
            # Unit-ish scale, like the sin/cos features (each of variance 1/2).
            label_emb = nn.Embed(
                self.num_classes,
                emb.shape[-1],
                embedding_init=nn.initializers.normal(stddev=0.5**0.5),
                param_dtype=jnp.float32,
            )(labels)
            emb = emb + label_emb
        temb = layers.dense(self.nf * 4, dtype)(emb)
        return layers.dense(self.nf * 4, dtype)(nn.swish(temb))

    def _encoder(self, x: Array, temb: Array, train: bool, dtype) -> list[Array]:
        """Downsampling path; returns every activation the decoder concatenates as a skip."""
        resnet, attn = self._resnet_block(dtype), self._attn_block(dtype)
        pyramid = x
        hs = [layers.conv3x3(self.nf, dtype=dtype)(x)]
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = resnet(out_ch=self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level == last:
                break
            if self.resblock_type == "ddpm":
                h = self._resample(layers.Downsample, dtype, self.resamp_with_conv)(hs[-1])
            else:
                h = resnet(down=True)(hs[-1], temb, train)
            h, pyramid = self._merge_input_pyramid(h, pyramid, dtype)
            hs.append(h)
        return hs

    def _merge_input_pyramid(self, h: Array, pyramid: Array, dtype) -> tuple[Array, Array]:
        """Feed a downsampled copy of the input into each new level (progressive growing input,
        Karras et al. 2018 / StyleGAN2). 'residual': a FIR conv-downsample of the running
        pyramid is added to h, and the sum becomes the new pyramid."""
        if self.progressive_input == "input_skip":
            pyramid = self._resample(layers.Downsample, dtype, with_conv=False)(pyramid)
            return layers.Combine(method=self.progressive_combine, dtype=dtype)(pyramid, h), pyramid
        if self.progressive_input == "residual":
            pyramid = self._resample(layers.Downsample, dtype, True, out_ch=h.shape[-1])(pyramid)
            pyramid = layers.skip_sum(pyramid, h, self.skip_rescale)
            return pyramid, pyramid
        return h, pyramid

    def _middle(self, h: Array, temb: Array, train: bool, dtype) -> Array:
        resnet = self._resnet_block(dtype)
        h = resnet()(h, temb, train)
        h = self._attn_block(dtype)()(h)
        return resnet()(h, temb, train)

    def _decoder(
        self, h: Array, hs: list[Array], temb: Array, train: bool, dtype, out_channels: int
    ) -> tuple[Array, Array | None]:
        """Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip."""
        resnet, attn = self._resnet_block(dtype), self._attn_block(dtype)
        hs = list(hs)
        pyramid = None
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet(out_ch=self.nf * self.ch_mult[level])(h, temb, train)
            if h.shape[1] in self.attn_resolutions:
                h = attn()(h)
            if self.progressive != "none":
                h, pyramid = self._output_pyramid(h, pyramid, level, dtype, out_channels)
            if level != 0:
                if self.resblock_type == "ddpm":
                    h = self._resample(layers.Upsample, dtype, self.resamp_with_conv)(h)
                else:
                    h = resnet(up=True)(h, temb, train)
        assert not hs, "every encoder skip must be consumed"
        return h, pyramid

    def _output_pyramid(
        self, h: Array, pyramid: Array | None, level: int, dtype, out_channels: int
    ) -> tuple[Array, Array]:
        """Progressive output ('output_skip': sum of upsampled per-level image predictions;
        'residual': an upsampled feature pyramid added back into h)."""

        def to_rgb(channels, init_scale):
            g = nn.swish(layers.group_norm(h.shape[-1], dtype)(h))
            return layers.conv3x3(channels, init_scale=init_scale, dtype=dtype)(g)

        first = level == len(self.ch_mult) - 1
        if self.progressive == "output_skip":
            if not first:
                pyramid = self._resample(layers.Upsample, dtype, with_conv=False)(pyramid)
            out = to_rgb(out_channels, self.init_scale)
            return h, out if first else pyramid + out
        # "residual"
        if first:
            return h, to_rgb(h.shape[-1], 1.0)
        pyramid = self._resample(layers.Upsample, dtype, True, out_ch=h.shape[-1])(pyramid)
        pyramid = layers.skip_sum(pyramid, h, self.skip_rescale)
        return pyramid, pyramid

    def _head(self, h: Array, pyramid: Array | None, out_channels: int) -> Array:
        """GroupNorm -> swish -> conv3x3 with init_scale (1e-10 for init_scale=0, so F starts
        at ~0). Run in float32: it is cheap and sets the precision of the returned F."""
        if self.progressive == "output_skip":
            return pyramid.astype(jnp.float32)
        h = nn.swish(layers.group_norm(h.shape[-1], jnp.float32)(h))
        return layers.conv3x3(out_channels, init_scale=self.init_scale, dtype=jnp.float32)(h)
