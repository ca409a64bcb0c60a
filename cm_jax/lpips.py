"""LPIPS(VGG16) (Zhang et al. 2018), the distance of CM's distillation, in two variants.

    d(x, y) = Σ_l mean_{h,w} Σ_c w_lc · (x̂_lhwc − ŷ_lhwc)²,
    x̂_l = φ_l(s(x)) / (‖φ_l(s(x))‖₂ + 1e-10)

with s the input normalisation, φ_l the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3,
relu5_3 (torchvision's `vgg16().features`), the norm over channels, and w_l ≥ 0 the five learned
"linear" heads (1,472 values, no bias). `lpips_distance(..., variant=...)` picks one of:

"lpips" (default): the `lpips` package, as the official JAX CM code uses it. Every constant
follows `lpips==0.1.4` (`lpips/lpips.py`: ScalingLayer, normalize_tensor, LPIPS.forward;
`lpips/pretrained_networks.py`: vgg16 slices): s(x) = (x − shift) / scale with
shift = (−.030, −.088, −.188), scale = (.458, .448, .450), and VGG16 with its max pools.

"piq": `piq.LPIPS(replace_pooling=True, reduction="none")`, what the official PyTorch CM code
builds (`cm/karras_diffusion.py`, KarrasDenoiser.__init__; `setup.py` pins piq==0.7.0, and
`piq/perceptual.py` is byte-identical in 0.8.0). The CM code maps its images to [0, 1] with
(x + 1)/2; piq (`piq/perceptual.py`, ContentLoss.get_features) then takes
(x01 − mean) / std with IMAGENET_MEAN = (.485, .456, .406), IMAGENET_STD = (.229, .224, .225),
and `replace_pooling` turns every MaxPool2d of the trunk into AvgPool2d(kernel_size=2,
stride=2, padding=0). The rest is the same formula as lpips: the taps relu1_2 … relu5_3
(piq's VGG16_LAYERS '3', '8', '15', '22', '29'), unit-normalised over channels with EPS = 1e-10
(ContentLoss.normalize), squared difference (nn.MSELoss(reduction='none')), weighted per
channel, averaged over space, summed over channels and layers (ContentLoss.forward).
So the two variants differ only in the pooling: their input normalisations are equal
(shift = 2·mean − 1, scale = 2·std exactly; only the float32 rounding order differs).

piq's heads are not in its wheel: it downloads them at run time (PIQ_HEADS_URL, release
v0.4.0 of photosynthesis.metrics, piq's former name) as a list of five [1, C, 1, 1] tensors.
That file cannot be fetched here, so its values are unverified; piq's repository points to
the lpips v0.1 VGG heads (its LPIPS is a port of richzhang/PerceptualSimilarity, piq issue #54;
the test `test_lpips_similar_to_official_implementation` of its branch refactoring/perceptual
checks piq's LPIPS, same URL, against lpips v0.1 VGG's score; its README's TID2013 SRCC / KRCC,
0.6696 / 0.4970, is what the DISTS paper reports for LPIPS-VGG, 0.670 / 0.497), so both
variants use the lpips v0.1 heads by default. To use piq's file itself, give it as the heads
file (`load_lpips_params(vgg, lin_path="lpips_weights.pt")`, or `convert --lin
lpips_weights.pt`); `convert` says whether its values are lpips v0.1's.

Inputs are in [−1, 1] for both variants.

Resizing: the official CM code resizes both images bilinearly to 224×224 before LPIPS (JAX:
CIFAR-10; PyTorch: when the width is below 256, `F.interpolate(x, size=224, mode="bilinear")`
in KarrasDenoiser's losses, so LSUN 256 is scored at 256). `lpips_distance` resizes when an
image is smaller than `resize_to` (`jax.image.resize`, bilinear, half-pixel centres; for
upsampling this equals PyTorch's `interpolate(mode="bilinear", align_corners=False)`, and
antialiasing has no effect). For 32, 64 and 256 pixels this is the CM rule; the PyTorch code
would also shrink a 224 … 255 image to 224, which this function leaves as it is.

Weights. The v0.1 heads come from the `lpips` wheel's `lpips/weights/v0.1/vgg.pth`.
The ImageNet VGG16 trunk is in no wheel and cannot be downloaded at run time here: the user
gives it as a file, either torchvision's `vgg16` state dict saved with `torch.save`, or the npz
that `python -m cm_jax.lpips convert --vgg VGG.pth --out lpips_vgg.npz` writes (trunk and heads
together; loading it needs neither torch nor a network). torch is imported only to read .pth
files. Both variants take the same parameters.

The parameters are a plain pytree: {"vgg": {"conv1_1": {"kernel", "bias"}, …, "conv5_3": …},
"lin0": [64], "lin1": [128], "lin2": [256], "lin3": [512], "lin4": [512]}, kernels in Flax
HWIO layout.
"""

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cm_jax import torch_files

# ---------------------------------------------------------------------------------------------
# Constants (lpips==0.1.4, piq==0.7.0 and torchvision's vgg16 "D" configuration)

SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer.shift
SCALE = (0.458, 0.448, 0.450)  # lpips.ScalingLayer.scale
NORM_EPS = 1e-10  # lpips.normalize_tensor; piq/perceptual.py EPS is the same 1e-10
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # piq/perceptual.py IMAGENET_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # piq/perceptual.py IMAGENET_STD
# piq/perceptual.py LPIPS._weights_url: the heads piq downloads (torch.hub) at run time.
PIQ_HEADS_URL = (
    "https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/"
    "lpips_weights.pt"
)
CHANNELS = (64, 128, 256, 512, 512)
FEATURE_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# (block, convs per block, width): conv3-64 ×2, pool, conv3-128 ×2, pool, conv3-256 ×3, pool,
# conv3-512 ×3, pool, conv3-512 ×3 (the last pool of `features` is not used by LPIPS).
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# Index of each conv in torchvision's `vgg16().features` (ReLUs and pools fill the gaps).
VGG16_FEATURE_INDEX = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
}

LPIPS_WHEEL = "lpips==0.1.4"
LPIPS_WHEEL_HEADS = "lpips/weights/v0.1/vgg.pth"
LPIPS_HEADS_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"
# sha256 of the five heads' values as little-endian float32, lin0 … lin4 in order: checks a
# converted npz whatever file it came from (torchmetrics ships the same values).
LPIPS_HEADS_VALUES_SHA256 = "9153a2043dccf3b525d4f13db916e93ef040548ea923b6f2100de5ebac141a78"
HEADS_NPZ = "lpips_v0.1_vgg_heads.npz"

VGG_HOWTO = (
    "LPIPS(VGG) needs torchvision's ImageNet VGG16 weights, which no package ships and "
    "cm_jax does not download. On a machine with internet and torchvision, save them with\n"
    '    python -c "import torch, torchvision; torch.save(torchvision.models.vgg16('
    "weights='IMAGENET1K_V1').state_dict(), 'vgg16.pth')\"\n"
    "then either point --config.loss.lpips_vgg_path at vgg16.pth (torch is then needed to read "
    "it), or convert it once (torch needed only there):\n"
    "    python -m cm_jax.lpips convert --vgg vgg16.pth --out lpips_vgg.npz\n"
    "and point --config.loss.lpips_vgg_path at lpips_vgg.npz."
)


class LPIPSWeightsError(FileNotFoundError):
    """The LPIPS weights are missing or unusable; the message says which file and how to get it."""


# ---------------------------------------------------------------------------------------------
# The network


def scale_input(x):
    """lpips.ScalingLayer: (x − shift) / scale on channel-last images in [−1, 1]."""
    shift = jnp.asarray(SHIFT, x.dtype)
    scale = jnp.asarray(SCALE, x.dtype)
    return (x - shift) / scale


def piq_scale_input(x):
    """The PyTorch CM code and piq on channel-last images in [−1, 1]: x01 = (x + 1) / 2
    (cm/karras_diffusion.py, the argument of self.lpips_loss), then (x01 − mean) / std
    (piq/perceptual.py, ContentLoss.get_features). Equal to `scale_input` but for float
    rounding; the operations are piq's, in piq's order."""
    mean = jnp.asarray(IMAGENET_MEAN, x.dtype)
    std = jnp.asarray(IMAGENET_STD, x.dtype)
    return ((x + 1) / 2 - mean) / std


def pool2x2(x, kind):
    """The pool between VGG16 blocks: "max" is torchvision's MaxPool2d(2, 2); "avg" is the
    AvgPool2d(kernel_size=2, stride=2, padding=0) that piq's ContentLoss.replace_pooling puts
    in its place. Both drop an odd last row or column, as PyTorch does (VALID windows)."""
    if kind == "max":
        return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    if kind == "avg":
        return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    raise ValueError(f"Unknown VGG16 pooling {kind!r}: use 'max' or 'avg'.")


# variant → (input normalisation, pooling). See the module docstring for the sources.
VARIANTS = {"lpips": (scale_input, "max"), "piq": (piq_scale_input, "avg")}


def normalize_channels(f, eps=NORM_EPS):
    """lpips.normalize_tensor over the last (channel) axis: f / (‖f‖₂ + eps).

    The forward value is exactly that of lpips. The norm is written so that its gradient at an
    all-zero feature vector (a pixel where every ReLU is off) is 0 rather than NaN: √s has an
    infinite derivative at s = 0, and inf · 0 would poison the whole gradient.
    """
    s = jnp.sum(f * f, axis=-1, keepdims=True)
    positive = s > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
    return f / (norm + eps)


class VGG16Features(nn.Module):
    """torchvision's vgg16 `features` up to relu5_3; returns the five LPIPS taps.
    pooling: "max" (torchvision, lpips) or "avg" (piq with replace_pooling=True)."""

    precision: jax.lax.Precision | None = None
    pooling: str = "max"

    @nn.compact
    def __call__(self, x):
        taps = []
        for block, convs, width in VGG16_BLOCKS:
            if block > 1:
                x = pool2x2(x, self.pooling)
            for i in range(1, convs + 1):
                x = nn.Conv(
                    width,
                    (3, 3),
                    padding=((1, 1), (1, 1)),
                    precision=self.precision,
                    name=f"conv{block}_{i}",
                )(x)
                x = nn.relu(x)
            taps.append(x)
        return taps


def combine_features(feats_x, feats_y, heads):
    """LPIPS from the two lists of trunk features: per layer, unit-normalise over channels,
    square the difference, apply the 1×1 head, average over space; sum the layers. → [B]."""
    total = 0.0
    for fx, fy, w in zip(feats_x, feats_y, heads, strict=True):
        diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2
        # The head is linear, so head(mean over space) = mean over space of head.
        total = total + jnp.mean(diff, axis=(1, 2)) @ w
    return total


class LPIPS(nn.Module):
    """LPIPS (VGG16): two [B, H, W, 3] images in [−1, 1] → [B]. No resizing here.
    variant: "lpips" or "piq" (a key of VARIANTS); both have the same parameters."""

    precision: jax.lax.Precision | None = None
    variant: str = "lpips"

    @nn.compact
    def __call__(self, x, y):
        heads = [
            self.param(f"lin{k}", nn.initializers.ones, (c,), jnp.float32)
            for k, c in enumerate(CHANNELS)
        ]
        normalise, pooling = VARIANTS[self.variant]
        vgg = VGG16Features(self.precision, pooling, name="vgg")
        # Two passes, not one over the concatenated batch: in the consistency losses y is the
        # stop-gradient target, and a joint pass would carry its (zero) tangents through the
        # whole backward pass, about a third more work and memory.
        return combine_features(vgg(normalise(x)), vgg(normalise(y)), heads)


def lpips_distance(params, x, y, resize_to=224, precision=None, variant="lpips"):
    """LPIPS(VGG) between x and y, [B, H, W, 3] in [−1, 1] → [B].

    Images smaller than resize_to (in height or width) are first resized bilinearly to
    resize_to × resize_to, as the official CM code does (224); resize_to=None never resizes.
    params: the pytree of `load_lpips_params` (or `init_params`). Pure and jit-able; pass the
    params as an argument of the jitted function rather than closing over them, so that the
    59 MB of VGG weights are not baked into the compiled program as constants.
    precision: of the convolutions (jax.lax.Precision). None is XLA's default, which on recent
    NVIDIA GPUs may compute float32 convolutions in TF32 (about 1e-3 relative); "highest"
    gives full float32, as on CPUs.
    variant: "lpips" (the lpips package: max pooling, the official JAX CM code) or "piq"
    (piq.LPIPS(replace_pooling=True): average pooling, the official PyTorch CM code).
    """
    if variant not in VARIANTS:
        raise ValueError(
            f"Unknown LPIPS variant {variant!r}: use 'lpips' (the lpips package, max pooling) "
            f"or 'piq' (piq.LPIPS(replace_pooling=True), average pooling)."
        )
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"LPIPS takes two [B, H, W, 3] arrays of one shape, got {x.shape} and {y.shape}."
        )
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    b, h, w, c = x.shape
    if resize_to and (h < resize_to or w < resize_to):
        shape = (b, resize_to, resize_to, c)
        x = jax.image.resize(x, shape, method="bilinear", antialias=False)
        y = jax.image.resize(y, shape, method="bilinear", antialias=False)
    return LPIPS(precision=precision, variant=variant).apply({"params": params}, x, y)


def param_shapes():
    """{flat "a/b/c" name: shape} of the full params pytree (traced, not computed)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"]
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


def init_params(seed=0):
    """Random params of the right structure (tests, shapes): He-normal kernels, zero biases,
    unit heads; numpy float32, so that nothing is compiled."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in sorted(param_shapes().items()):
        if name.endswith("kernel"):
            std = np.sqrt(2.0 / (shape[0] * shape[1] * shape[2]))
            params[name] = rng.standard_normal(shape, np.float32) * np.float32(std)
        elif name.endswith("bias"):
            params[name] = np.zeros(shape, np.float32)
        else:
            params[name] = np.ones(shape, np.float32)
    return traverse_util.unflatten_dict(params, sep="/")


# ---------------------------------------------------------------------------------------------
# Weights: torch state dicts → params, npz files


def _torch_load_object(path, expected, hint=""):
    """torch.load(path) of tensors only; `expected` (what the file should hold) and `hint` go
    into the error message when it cannot be read."""
    convert = "Or convert it where torch is installed with `python -m cm_jax.lpips convert`."
    try:
        return torch_files.load_tensors(path, expected, convert)
    except (ImportError, torch_files.TorchFileError) as e:
        raise LPIPSWeightsError(f"{e}{hint}") from e


def _as_numpy(value):
    return np.asarray(value.detach().float().cpu().numpy(), np.float32)


def _state_dict_arrays(state_dict):
    return {k: _as_numpy(v) for k, v in state_dict.items() if hasattr(v, "numpy")}


def _torch_load(path):
    obj = _torch_load_object(
        path,
        "a PyTorch state dict",
        f" It must be a state dict saved with torch.save(model.state_dict(), path).\n{VGG_HOWTO}",
    )
    if not isinstance(obj, dict):
        raise LPIPSWeightsError(
            f"{path} holds a {type(obj).__name__}, not a state dict.\n{VGG_HOWTO}"
        )
    return _state_dict_arrays(obj)


def vgg_params_from_state_dict(state_dict):
    """The trunk params from a torch state dict of torchvision's vgg16 (`features.N.*`), of its
    `features` Sequential (`N.*`), or of an lpips.LPIPS module (`net.sliceK.N.*`)."""
    by_index = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) < 2 or parts[-1] not in ("weight", "bias") or not parts[-2].isdigit():
            continue
        prefix = ".".join(parts[:-2])
        if prefix in ("features", "") or (prefix.startswith("net.slice") and prefix[9:].isdigit()):
            by_index[(int(parts[-2]), parts[-1])] = np.asarray(value, np.float32)
    params = {}
    missing = []
    for name, idx in VGG16_FEATURE_INDEX.items():
        w, b = by_index.get((idx, "weight")), by_index.get((idx, "bias"))
        if w is None or b is None:
            missing.append(f"features.{idx}")
            continue
        # torch OIHW → Flax HWIO.
        params[name] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}
    if missing:
        raise LPIPSWeightsError(
            f"Not a torchvision vgg16 state dict: no weight/bias for {', '.join(missing)} "
            f"(found {len(state_dict)} entries).\n{VGG_HOWTO}"
        )
    return params


def heads_from_state_dict(state_dict):
    """The five heads from lpips' `weights/v0.1/vgg.pth` (`linK.model.1.weight`, [1, C, 1, 1];
    `linK.model.0.weight` without dropout) or an lpips.LPIPS state dict."""
    heads = {}
    for k, c in enumerate(CHANNELS):
        w = state_dict.get(f"lin{k}.model.1.weight", state_dict.get(f"lin{k}.model.0.weight"))
        if w is None:
            raise LPIPSWeightsError(
                f"No LPIPS head lin{k} in the state dict (keys: {sorted(state_dict)[:8]} …)."
            )
        heads[f"lin{k}"] = np.asarray(w, np.float32).reshape(c)
    return heads


def heads_from_piq_list(tensors, what="piq's lpips_weights.pt"):
    """The five heads from piq's `lpips_weights.pt` (PIQ_HEADS_URL): a list of five tensors that
    piq/perceptual.py (ContentLoss.forward) multiplies into the [B, C, H, W] squared feature
    differences, so each holds C values on the channel axis ([1, C, 1, 1], as lpips' heads)."""
    if len(tensors) != len(CHANNELS):
        raise LPIPSWeightsError(
            f"{what} holds {len(tensors)} tensors; piq's LPIPS heads are {len(CHANNELS)}, one per "
            f"VGG16 layer relu1_2 … relu5_3."
        )
    heads = {}
    for k, (w, c) in enumerate(zip(tensors, CHANNELS)):
        w = _as_numpy(w) if hasattr(w, "detach") else np.asarray(w, np.float32)
        # [B, C, H, W] · w weighs channels only if C sits third from the end, alone.
        if w.ndim < 3 or w.shape[-3] != c or w.size != c:
            raise LPIPSWeightsError(
                f"{what}: head {k} has shape {w.shape}; piq's head {k} is [1, {c}, 1, 1]."
            )
        heads[f"lin{k}"] = w.reshape(c)
    return heads


def heads_fingerprint(params):
    h = hashlib.sha256()
    for k in range(len(CHANNELS)):
        h.update(np.ascontiguousarray(np.asarray(params[f"lin{k}"]), dtype="<f4").tobytes())
    return h.hexdigest()


def _check(params, what):
    """Every expected array there, with its shape; the heads non-negative."""
    flat = traverse_util.flatten_dict(params, sep="/")
    want = param_shapes()
    wrong = [
        f"{k}: {tuple(np.shape(flat[k])) if k in flat else 'missing'} (want {s})"
        for k, s in want.items()
        if k not in flat or tuple(np.shape(flat[k])) != s
    ]
    if wrong:
        raise LPIPSWeightsError(
            f"{what} does not hold LPIPS(VGG16) weights: " + "; ".join(wrong[:5])
        )
    for k in range(len(CHANNELS)):
        if np.any(np.asarray(params[f"lin{k}"]) < 0):
            raise LPIPSWeightsError(
                f"{what}: head lin{k} has negative weights; LPIPS heads are non-negative."
            )
    return params


def save_npz(params, path):
    flat = traverse_util.flatten_dict(params, sep="/")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.replace(tmp, path)


def load_npz(path):
    with np.load(path) as f:
        return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def default_cache_dir():
    return os.environ.get(
        "CM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cm_jax", "lpips")
    )


def _heads_from_wheel(cache_dir):
    """lpips' vgg.pth: from an installed `lpips` package (found without importing it, which
    would need torchvision), else from the lpips wheel that pip downloads into cache_dir."""
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        pth = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "vgg.pth")
        if os.path.exists(pth):
            return pth, None
    os.makedirs(cache_dir, exist_ok=True)

    def wheels():
        return [
            f for f in os.listdir(cache_dir) if f.startswith("lpips-0.1.4") and f.endswith(".whl")
        ]

    if not wheels():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            cache_dir,
            LPIPS_WHEEL,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not wheels():
            raise LPIPSWeightsError(
                f"Could not get the LPIPS heads: `{' '.join(cmd)}` failed:\n{res.stderr[-2000:]}\n"
                f"Give them with lin_path= (lpips' {LPIPS_WHEEL_HEADS}) or use an npz made by "
                f"`python -m cm_jax.lpips convert`."
            )
    tmpdir = tempfile.mkdtemp(dir=cache_dir)
    with zipfile.ZipFile(os.path.join(cache_dir, wheels()[0])) as z:
        return z.extract(LPIPS_WHEEL_HEADS, tmpdir), tmpdir


def _heads_from_torch_file(path):
    """Heads from lpips' vgg.pth (a state dict) or piq's lpips_weights.pt (a list)."""
    expected = "LPIPS heads (lpips' weights/v0.1/vgg.pth or piq's lpips_weights.pt)"
    obj = _torch_load_object(path, expected)
    if isinstance(obj, dict):
        return heads_from_state_dict(_state_dict_arrays(obj))
    if isinstance(obj, (list, tuple)):
        return heads_from_piq_list(obj, what=path)
    raise LPIPSWeightsError(f"{path} holds a {type(obj).__name__}, not {expected}.")


def load_heads(lin_path=None, cache_dir=None):
    """The five LPIPS VGG heads as {"lin0": [64], …}: lpips v0.1's unless lin_path says otherwise.

    lin_path: lpips' `weights/v0.1/vgg.pth`, piq's `lpips_weights.pt` (PIQ_HEADS_URL) or an npz
    with lin0 … lin4. Without it: the cached
    npz in cache_dir (default ~/.cache/cm_jax/lpips, or $CM_JAX_CACHE), made on first use from
    the lpips wheel (installed, or downloaded with pip; reading it needs torch once).
    """
    if lin_path:
        if not os.path.exists(lin_path):
            raise LPIPSWeightsError(f"LPIPS heads file {lin_path} does not exist.")
        heads = (
            load_npz(lin_path) if lin_path.endswith(".npz") else _heads_from_torch_file(lin_path)
        )
        heads = {f"lin{k}": np.asarray(heads[f"lin{k}"], np.float32) for k in range(5)}
    else:
        cache_dir = cache_dir or default_cache_dir()
        cached = os.path.join(cache_dir, HEADS_NPZ)
        if os.path.exists(cached):
            heads = load_npz(cached)
        else:
            pth, tmpdir = _heads_from_wheel(cache_dir)
            with open(pth, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != LPIPS_HEADS_SHA256:
                raise LPIPSWeightsError(f"{pth} is not lpips 0.1.4's vgg.pth (sha256 {digest}).")
            heads = heads_from_state_dict(_torch_load(pth))
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            save_npz(heads, cached)
        heads = {f"lin{k}": np.asarray(heads[f"lin{k}"], np.float32) for k in range(5)}
        if heads_fingerprint(heads) != LPIPS_HEADS_VALUES_SHA256:
            raise LPIPSWeightsError(
                f"The cached heads in {cache_dir} are not the LPIPS v0.1 VGG "
                f"heads; delete {HEADS_NPZ} there."
            )
    return heads


def check_weights_path(vgg_path):
    """LPIPSWeightsError, saying how to make the file, unless vgg_path names an existing file
    (checked before a run writes anything; reading it waits for `load_lpips_params`)."""
    if not vgg_path:
        raise LPIPSWeightsError(
            f"No VGG16 weights given for LPIPS (loss.lpips_vgg_path is empty).\n{VGG_HOWTO}"
        )
    if not os.path.isfile(vgg_path):
        raise LPIPSWeightsError(f"The VGG16 weights file {vgg_path} does not exist.\n{VGG_HOWTO}")


def load_lpips_params(vgg_path, lin_path=None, cache_dir=None):
    """The full LPIPS params pytree (numpy arrays) for `lpips_distance`.

    vgg_path: torchvision's vgg16 state dict (.pth, needs torch) or an npz from
    `python -m cm_jax.lpips convert` (trunk and heads; needs nothing else). Heads not in the
    file come from `load_heads(lin_path, cache_dir)`. A missing or empty vgg_path raises
    LPIPSWeightsError saying how to make the file.
    """
    check_weights_path(vgg_path)
    if vgg_path.endswith(".npz"):
        params = load_npz(vgg_path)
        if "vgg" not in params:
            raise LPIPSWeightsError(
                f"{vgg_path} has no vgg/… arrays; make it with "
                f"`python -m cm_jax.lpips convert`.\n{VGG_HOWTO}"
            )
    else:
        params = {"vgg": vgg_params_from_state_dict(_torch_load(vgg_path))}
    if lin_path or any(f"lin{k}" not in params for k in range(5)):
        params.update(load_heads(lin_path, cache_dir))
    return _check(params, vgg_path)


def convert(vgg_path, out_path, lin_path=None, cache_dir=None):
    """Write one self-contained npz (trunk and heads) for `load_lpips_params`."""
    params = load_lpips_params(vgg_path, lin_path, cache_dir)
    save_npz(params, out_path)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cm_jax.lpips", description="LPIPS(VGG16) weights for cm_jax."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="torchvision vgg16 state dict (+ LPIPS heads) → npz")
    conv.add_argument(
        "--vgg",
        required=True,
        help="torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), PATH)",
    )
    conv.add_argument("--out", required=True, help="the npz to write")
    conv.add_argument(
        "--lin",
        default=None,
        help="lpips' weights/v0.1/vgg.pth or piq's lpips_weights.pt (default: lpips v0.1's, "
        "from the lpips wheel)",
    )
    conv.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    try:
        params = convert(args.vgg, args.out, args.lin, args.cache_dir)
    except LPIPSWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
    fingerprint = heads_fingerprint(params)
    # Says whether a given heads file (piq's, say) holds the lpips v0.1 values.
    same = fingerprint == LPIPS_HEADS_VALUES_SHA256
    which = "the lpips v0.1 VGG heads" if same else "heads that differ from lpips v0.1's"
    print(
        f"wrote {args.out}: {n:,} values (VGG16 trunk to relu5_3 and 5 LPIPS heads: {which}; "
        f"heads sha256 {fingerprint[:12]}…)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
