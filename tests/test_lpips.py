"""LPIPS(VGG16) v0.1: the math by hand, and parity with the `lpips` PyTorch package.

Parity set-up. The ImageNet VGG16 cannot be had offline, so both sides get the same random
trunk and the real v0.1 heads of lpips==0.1.4 (its `weights/v0.1/vgg.pth`, through our loader).
`lpips` imports torchvision for exactly one thing, `tv.vgg16(pretrained=...).features` in
`lpips/pretrained_networks.py`; PyPI's torchvision wheels do not import beside the CPU torch
wheel (their compiled ops are built for the CUDA torch: "operator torchvision::nms does not
exist"), and the CUDA torch they want costs gigabytes. So the test puts a stand-in `torchvision`
module in sys.modules whose `models.vgg16()` returns torchvision's `features` layout built here
from torch.nn layers (cfg "D": 3×3 convs with padding 1, in-place ReLUs, 2×2 max pools; the
same module indices 0 … 30). Everything else — lpips.LPIPS, its slicing of the trunk at
relu1_2 … relu5_3, ScalingLayer, normalize_tensor, the heads and the spatial average — is the
package's own code. Needs `torch` (CPU) and `lpips` (--no-deps); skipped without them.
"""

import contextlib
import importlib.util
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import lpips as L

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR10_TEST = [
    os.path.join(HERE, "..", "..", "shared", "data", "cifar10", "test.npz"),
    "/work/shared/data/cifar10/test.npz",
]


# Every 32×32 call below has this batch, so that one compiled network serves them all
# (compiling VGG16 on a CPU takes seconds).
B = 8
distance = jax.jit(L.lpips_distance, static_argnames=("resize_to", "precision"))


@pytest.fixture(scope="module")
def rand_params():
    return L.init_params(0)


def _images(n, size=32, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, (n, size, size, 3), minval=-1.0, maxval=1.0)
    y = jax.random.uniform(k2, (n, size, size, 3), minval=-1.0, maxval=1.0)
    return x, y


# ---------------------------------------------------------------------------------------------
# The math, without torch


def test_scaling_layer_is_imagenet_normalisation_of_01_images():
    # lpips' shift/scale on [−1, 1] = torchvision's mean/std on [0, 1] (what the official JAX
    # CM code feeds its VGG16): shift = 2·mean − 1, scale = 2·std.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(L.SHIFT, 2 * mean - 1, atol=1e-12)
    np.testing.assert_allclose(L.SCALE, 2 * std, atol=1e-12)
    x = jax.random.uniform(jax.random.key(3), (2, 4, 4, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(L.scale_input(x), ((x + 1) / 2 - mean) / std, rtol=1e-5, atol=1e-5)


def test_normalize_channels_units_and_eps_and_finite_gradient():
    f = jnp.array([[[[3.0, 4.0]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]
    out = L.normalize_channels(f)
    np.testing.assert_allclose(out[0, 0, 0], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(out[0, 1, 0], [0.0, 0.0])
    tiny = jnp.full((1, 1, 1, 1), 1e-10)  # 1e-10 / (1e-10 + 1e-10)
    np.testing.assert_allclose(L.normalize_channels(tiny), 0.5, rtol=1e-5)
    # √ at 0 has an infinite derivative; the gradient must still be finite (here exactly 0
    # from the norm, 1/eps from the direct path, times the upstream 0 of a zero vector).
    g = jax.grad(lambda f: jnp.sum(L.normalize_channels(f) * jnp.array([1.0, 2.0])))(f)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_hand_worked_two_layer_example():
    # Layer A: 2 pixels × 2 channels; layer B: 1 pixel × 1 channel.
    # A, pixel 1: x̂ = (0.6, 0.8), ŷ = (0, 1) → (x̂ − ŷ)² = (0.36, 0.04)
    # A, pixel 2: x̂ = (1, 0),     ŷ = (1, 0) → (0, 0); mean over space: (0.18, 0.02)
    # head A = (1, 2): 0.18 + 0.04 = 0.22.  B: x̂ = 1, ŷ = 0 (zero vector) → 1; head 0.5 → 0.5.
    fx = [jnp.array([[[[3.0, 4.0]], [[2.0, 0.0]]]]), jnp.array([[[[7.0]]]])]
    fy = [jnp.array([[[[0.0, 5.0]], [[9.0, 0.0]]]]), jnp.array([[[[0.0]]]])]
    d = L.combine_features(fx, fy, [jnp.array([1.0, 2.0]), jnp.array([0.5])])
    np.testing.assert_allclose(d, [0.72], rtol=1e-6)


def test_identity_symmetry_nonnegativity_shape(rand_params):
    x, y = _images(B)
    dxy = distance(rand_params, x, y, resize_to=None)
    dyx = distance(rand_params, y, x, resize_to=None)
    dxx = distance(rand_params, x, x, resize_to=None)
    assert dxy.shape == (B,)
    np.testing.assert_array_equal(dxx, 0.0)
    np.testing.assert_allclose(dxy, dyx, rtol=1e-6)
    assert bool(jnp.all(dxy > 0))
    # With unit heads each layer adds mean over space of ‖x̂ − ŷ‖² ≤ 4.
    assert bool(jnp.all(dxy <= 4 * 5))


def test_resize_only_when_smaller(rand_params):
    # Smaller: both images are resized bilinearly, without antialiasing, to resize_to².
    # (That this resize is PyTorch's bilinear one is checked in test_parity_resized_224.)
    x, y = _images(B)
    jaxpr = lambda r: str(
        jax.make_jaxpr(  # noqa: E731
            lambda p, a, b: L.lpips_distance(p, a, b, resize_to=r)
        )(rand_params, x, y)
    )
    assert jaxpr(32) == jaxpr(None) == jaxpr(0) == jaxpr(16)
    assert jaxpr(33) != jaxpr(None)
    assert "f32[8,33,33,3]" in jaxpr(33)


def test_gradient_is_finite_at_zero_features():
    # A pixel where every ReLU of a layer is off gives an all-zero feature vector; lpips' norm
    # √(Σf²) there would make the gradient NaN. Ours stays finite.
    fx = [jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(1.0)]
    fy = [jnp.ones((1, 2, 2, 4))]
    for args in ((fx, fy), (fy, fx), (fx, fx)):
        g = jax.grad(lambda a, b: L.combine_features(a, b, [jnp.ones(4)]).sum())(*args)
        assert bool(jnp.all(jnp.isfinite(g[0])))


def test_missing_vgg_file_says_what_to_do(tmp_path):
    for path in ("", str(tmp_path / "nope.pth")):
        with pytest.raises(L.LPIPSWeightsError) as e:
            L.load_lpips_params(path)
        msg = str(e.value)
        assert "vgg16" in msg and "IMAGENET1K_V1" in msg and "cm_jax.lpips convert" in msg


def test_npz_roundtrip_and_checks(tmp_path, rand_params):
    params = rand_params
    path = str(tmp_path / "lp.npz")
    L.save_npz(params, path)
    loaded = L.load_lpips_params(path)  # heads in the file: no download
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    bad = dict(params, lin2=-np.ones(256, np.float32))
    L.save_npz(bad, path)
    with pytest.raises(L.LPIPSWeightsError, match="non-negative"):
        L.load_lpips_params(path)
    vgg = dict(params["vgg"])
    vgg.pop("conv5_3")
    L.save_npz(dict(params, vgg=vgg), path)
    with pytest.raises(L.LPIPSWeightsError, match="conv5_3"):
        L.load_lpips_params(path)


def test_state_dict_naming():
    rng = np.random.default_rng(0)
    sd = {}
    cin = 3
    for name, idx in L.VGG16_FEATURE_INDEX.items():
        cout = {"1": 64, "2": 128, "3": 256, "4": 512, "5": 512}[name[4]]
        sd[f"features.{idx}.weight"] = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        sd[f"features.{idx}.bias"] = rng.standard_normal(cout).astype(np.float32)
        cin = cout
    sd["classifier.0.weight"] = np.zeros((2, 2), np.float32)
    p = L.vgg_params_from_state_dict(sd)
    w = sd["features.7.weight"]  # conv2_2, OIHW
    np.testing.assert_array_equal(p["conv2_2"]["kernel"][1, 2, 5, 9], w[9, 5, 1, 2])
    np.testing.assert_array_equal(p["conv5_3"]["bias"], sd["features.28.bias"])
    del sd["features.28.bias"]
    with pytest.raises(L.LPIPSWeightsError, match="features.28"):
        L.vgg_params_from_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# Parity with the lpips package


def _torch_vgg16_features(torch):
    """torchvision's vgg16().features (cfg "D"), layer for layer, indices 0 … 30."""
    nn = torch.nn
    layers, cin = [], 3
    for v in (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    features = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.Conv2d):  # He-normal keeps every layer's activations O(1).
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return features


@contextlib.contextmanager
def _lpips_with_standin_torchvision(torch, features):
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")

    def vgg16(pretrained=False, **kwargs):
        assert not pretrained, "the ImageNet trunk is not available offline"
        return types.SimpleNamespace(features=features)

    tv.models.vgg16 = vgg16
    saved = {
        k: v
        for k, v in sys.modules.items()
        if k == "lpips"
        or k.startswith("lpips.")
        or k == "torchvision"
        or k.startswith("torchvision.")
    }
    for k in saved:
        del sys.modules[k]
    sys.modules["torchvision"], sys.modules["torchvision.models"] = tv, tv.models
    try:
        import lpips

        yield lpips
    finally:
        for k in [
            k
            for k in sys.modules
            if k == "lpips"
            or k.startswith("lpips.")
            or k == "torchvision"
            or k.startswith("torchvision.")
        ]:
            del sys.modules[k]
        sys.modules.update(saved)


def _cifar_pairs(n):
    path = next((p for p in CIFAR10_TEST if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"CIFAR-10 test set not found at {CIFAR10_TEST}")
    with np.load(path) as f:
        imgs = f["images"][: 2 * n].astype(np.float32) / 127.5 - 1.0
    return imgs[:n], imgs[n:]


@pytest.fixture(scope="module")
def torch_lpips():
    torch = pytest.importorskip(
        "torch", reason="parity needs torch: pip install torch==2.13.0 (the CPU wheel)"
    )
    if importlib.util.find_spec("lpips") is None:
        pytest.skip("parity needs the lpips package: pip install --no-deps lpips==0.1.4")
    features = _torch_vgg16_features(torch)
    with _lpips_with_standin_torchvision(torch, features) as lpips:
        model = lpips.LPIPS(
            net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False
        ).eval()
        heads_pth = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
        yield torch, model, features, heads_pth


@pytest.fixture(scope="module")
def ported(torch_lpips):
    torch, model, features, heads_pth = torch_lpips
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    params = {"vgg": L.vgg_params_from_state_dict(sd), **L.load_heads(heads_pth)}
    return L._check(params, "ported")


def test_constants_match_lpips(torch_lpips, ported):
    torch, model, _, _ = torch_lpips
    np.testing.assert_array_equal(model.scaling_layer.shift.numpy().ravel(), np.float32(L.SHIFT))
    np.testing.assert_array_equal(model.scaling_layer.scale.numpy().ravel(), np.float32(L.SCALE))
    assert tuple(model.chns) == L.CHANNELS
    for k in range(5):  # the heads lpips itself loaded
        np.testing.assert_array_equal(
            model.lins[k].model[-1].weight.detach().numpy().ravel(), ported[f"lin{k}"]
        )
    assert L.heads_fingerprint(ported) == L.LPIPS_HEADS_VALUES_SHA256
    # The lpips module's own state dict (net.sliceK.N.*) converts to the same trunk.
    from_module = L.vgg_params_from_state_dict(
        {k: v.numpy() for k, v in model.state_dict().items()}
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_module, ported["vgg"])


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b) / np.abs(b)))


def test_parity_native_32(torch_lpips, ported):
    # Distinct CIFAR-10 test images, then each image against itself plus noise of std 0.1 (a
    # distance some 10× smaller). Closer pairs lose relative precision in float32 on both
    # sides alike: (x̂ − ŷ)² cancels (about 4e-6 at noise 0.01, 4e-5 at 0.001).
    torch, model, _, _ = torch_lpips
    x, y = _cifar_pairs(B)
    noisy = np.clip(x + 0.1 * np.random.default_rng(0).standard_normal(x.shape), -1, 1)
    for a, b in ((x, y), (x, noisy.astype(np.float32))):
        with torch.no_grad():
            ref = (
                model(
                    torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2)
                )
                .numpy()
                .reshape(-1)
            )
        ours = distance(ported, a, b, resize_to=None)
        assert _rel_err(ours, ref) < 1e-5, (ours, ref)


def test_parity_resized_224(torch_lpips, ported):
    # The CM set-up: 32×32 images upsampled bilinearly to 224×224 (PyTorch align_corners=False
    # on the lpips side, jax.image.resize on ours).
    torch, model, _, _ = torch_lpips
    x, y = _cifar_pairs(2)
    up = lambda a: torch.nn.functional.interpolate(  # noqa: E731
        torch.from_numpy(a).permute(0, 3, 1, 2),
        size=(224, 224),
        mode="bilinear",
        align_corners=False,
    )
    with torch.no_grad():
        ref = model(up(x), up(y)).numpy().reshape(-1)
    ours = distance(ported, x, y, resize_to=224)
    assert _rel_err(ours, ref) < 1e-5, (ours, ref)


def test_convert_cli(torch_lpips, ported, tmp_path):
    torch, _, features, heads_pth = torch_lpips
    pth, out = str(tmp_path / "vgg16.pth"), str(tmp_path / "lpips_vgg.npz")
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd["classifier.6.bias"] = torch.zeros(1000)  # ignored, as in a real vgg16 file
    torch.save(sd, pth)
    assert L.main(["convert", "--vgg", pth, "--out", out, "--lin", heads_pth]) == 0
    loaded = L.load_lpips_params(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, ported)
    # The .pth is also accepted directly.
    direct = L.load_lpips_params(pth, lin_path=heads_pth)
    jax.tree_util.tree_map(np.testing.assert_array_equal, direct, ported)
    # Heads by default: from the installed lpips package, then cached as npz.
    cache = str(tmp_path / "cache")
    heads = L.load_heads(cache_dir=cache)
    assert os.path.exists(os.path.join(cache, L.HEADS_NPZ))
    for k in range(5):
        np.testing.assert_array_equal(heads[f"lin{k}"], ported[f"lin{k}"])
        np.testing.assert_array_equal(L.load_heads(cache_dir=cache)[f"lin{k}"], heads[f"lin{k}"])
