"""LPIPS(VGG16): the math by hand, and parity with the `lpips` and `piq` PyTorch packages.

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

The "piq" variant is checked the same way against `piq.LPIPS(replace_pooling=True,
reduction="none")` of piq==0.7.0 (`pip install --no-deps piq==0.7.0`), built and called as the
official PyTorch CM code does (cm/karras_diffusion.py). piq's package __init__ imports every
metric, some of which need torchvision's compiled ops, so the test imports only
`piq/perceptual.py` (which needs `piq.utils` and `piq.functional`, plain torch) under an empty
`piq` package, with the same stand-in torchvision (piq asks for `vgg16(pretrained=True)` and
gets the random trunk). piq downloads its heads at run time (torch.hub, PIQ_HEADS_URL); the
stand-in download returns the lpips v0.1 heads as the five [1, C, 1, 1] tensors piq expects.
Everything else — replace_pooling, the ImageNet normalisation, the taps, normalize, the MSE,
the weighting and the averaging — is piq's own code.
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
distance = jax.jit(L.lpips_distance, static_argnames=("resize_to", "precision", "variant"))


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


def test_piq_input_normalisation_by_hand():
    # Channel 0 (mean .485, std .229) at x = −1, 0, 1, i.e. x01 = 0, .5, 1:
    # −.485/.229 = −2.1179039…, .015/.229 = .0655021…, .515/.229 = 2.2489083…
    # Channel 2 (mean .406, std .225) at x = 0: .094/.225 = .4177777…
    x = jnp.zeros((1, 1, 3, 3)).at[0, 0, :, 0].set(jnp.array([-1.0, 0.0, 1.0]))
    out = L.piq_scale_input(x)
    # (float32 loses about 1e-6 relative in .5 − .485.)
    np.testing.assert_allclose(out[0, 0, :, 0], [-2.1179039, 0.0655022, 2.2489083], rtol=1e-5)
    np.testing.assert_allclose(out[0, 0, 1, 2], 0.4177778, rtol=1e-5)
    # The lpips ScalingLayer is the same map (shift = 2·mean − 1, scale = 2·std).
    x = jax.random.uniform(jax.random.key(4), (2, 4, 4, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(L.piq_scale_input(x), L.scale_input(x), rtol=1e-5, atol=1e-6)


def test_pools_by_hand():
    # 4×4 image 0 … 15 row by row; its 2×2 blocks are {0,1,4,5}, {2,3,6,7}, {8,9,12,13},
    # {10,11,14,15}: means 2.5, 4.5, 10.5, 12.5 (piq's AvgPool2d), maxima 5, 7, 13, 15.
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    np.testing.assert_array_equal(L.pool2x2(x, "avg")[0, ..., 0], [[2.5, 4.5], [10.5, 12.5]])
    np.testing.assert_array_equal(L.pool2x2(x, "max")[0, ..., 0], [[5, 7], [13, 15]])
    # 5×5: the last row and column are dropped (PyTorch's floor), so the same 2×2 blocks.
    x5 = jnp.arange(25.0).reshape(1, 5, 5, 1)  # blocks {0,1,5,6} … → 3, 5, 13, 15
    np.testing.assert_array_equal(L.pool2x2(x5, "avg")[0, ..., 0], [[3, 5], [13, 15]])
    with pytest.raises(ValueError, match="pooling"):
        L.pool2x2(x, "min")


def test_variant_selects_pooling_and_rejects_unknown(rand_params):
    x, y = _images(B)
    jaxpr = lambda v: str(  # noqa: E731
        jax.make_jaxpr(lambda p, a, b: L.lpips_distance(p, a, b, resize_to=None, variant=v))(
            rand_params, x, y
        )
    )
    # 4 pools in each of the two passes: max pools for lpips, sum (average) pools for piq.
    lp, pq = jaxpr("lpips"), jaxpr("piq")
    assert lp.count("reduce_window_max") == 8 and "reduce_window_sum" not in lp
    assert pq.count("reduce_window_sum") == 8 and "reduce_window_max" not in pq
    assert jaxpr("lpips") == str(
        jax.make_jaxpr(lambda p, a, b: L.lpips_distance(p, a, b, resize_to=None))(rand_params, x, y)
    )
    with pytest.raises(ValueError, match="Unknown LPIPS variant 'PIQ'"):
        L.lpips_distance(rand_params, x, y, variant="PIQ")


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
def _modules_replaced(packages, stand_ins):
    """Within the block, sys.modules has none of `packages` (nor their submodules) but the
    `stand_ins` (named inside `packages`); afterwards it is as before."""
    ours = lambda k: any(k == p or k.startswith(p + ".") for p in packages)  # noqa: E731
    saved = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved:
        del sys.modules[k]
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _standin_torchvision(vgg16):
    """A `torchvision` whose models.vgg16 is the given function; vgg19, which piq/perceptual.py
    imports beside it but LPIPS never calls, refuses."""

    def vgg19(*args, **kwargs):
        raise AssertionError("only vgg16 has a stand-in")

    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.vgg16, tv.models.vgg19 = vgg16, vgg19
    return {"torchvision": tv, "torchvision.models": tv.models}


@contextlib.contextmanager
def _lpips_with_standin_torchvision(torch, features):
    def vgg16(pretrained=False, **kwargs):
        assert not pretrained, "the ImageNet trunk is not available offline"
        return types.SimpleNamespace(features=features)

    with _modules_replaced(("lpips", "torchvision"), _standin_torchvision(vgg16)):
        import lpips

        yield lpips


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


# ---------------------------------------------------------------------------------------------
# Parity with piq (the official PyTorch CM code's LPIPS)


@contextlib.contextmanager
def _piq_perceptual_with_standins(torch, features, heads):
    """piq/perceptual.py imported alone, with the stand-in torchvision and download; yields the
    module and the URLs piq asked torch.hub for."""
    spec = importlib.util.find_spec("piq")
    package = types.ModuleType("piq")  # Not piq/__init__.py, which imports every metric.
    package.__path__ = list(spec.submodule_search_locations)
    requested = []

    def vgg16(pretrained=False, **kwargs):  # piq asks for the ImageNet trunk; it gets ours.
        return types.SimpleNamespace(features=features)

    def load_state_dict_from_url(url, **kwargs):
        requested.append(url)
        return [torch.from_numpy(h.reshape(1, -1, 1, 1)) for h in heads]

    stand_ins = {"piq": package, **_standin_torchvision(vgg16)}
    with (
        _modules_replaced(("piq", "torchvision"), stand_ins),
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setattr(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
        yield importlib.import_module("piq.perceptual"), requested


@pytest.fixture(scope="module")
def torch_piq(torch_lpips, ported):
    torch = torch_lpips[0]
    if importlib.util.find_spec("piq") is None:
        pytest.skip("piq parity needs the piq package: pip install --no-deps piq==0.7.0")
    # A trunk of its own: replace_pooling swaps the pools of the Sequential it is given.
    features = _torch_vgg16_features(torch)
    heads = [ported[f"lin{k}"] for k in range(5)]
    with _piq_perceptual_with_standins(torch, features, heads) as (perceptual, requested):
        # As cm/karras_diffusion.py, KarrasDenoiser.__init__ builds it.
        model = perceptual.LPIPS(replace_pooling=True, reduction="none")
        yield torch, perceptual, model, requested


@pytest.fixture(scope="module")
def piq_ported(torch_piq, ported):
    _, _, model, _ = torch_piq
    sd = {k: v.numpy() for k, v in model.model.state_dict().items()}  # "N.weight" keys
    params = {
        "vgg": L.vgg_params_from_state_dict(sd),
        **{f"lin{k}": ported[f"lin{k}"] for k in range(5)},
    }
    return L._check(params, "piq_ported")


def test_constants_match_piq(torch_piq, piq_ported):
    torch, perceptual, model, requested = torch_piq
    assert requested == [L.PIQ_HEADS_URL] == [perceptual.LPIPS._weights_url]
    assert tuple(perceptual.IMAGENET_MEAN) == L.IMAGENET_MEAN
    assert tuple(perceptual.IMAGENET_STD) == L.IMAGENET_STD
    assert perceptual.EPS == L.NORM_EPS
    assert model.layers == [perceptual.VGG16_LAYERS[n] for n in L.FEATURE_NAMES]
    assert model.layers == ["3", "8", "15", "22", "29"]
    assert model.normalize_features and isinstance(model.distance, torch.nn.MSELoss)
    # Every pool of the trunk is now AvgPool2d(2, 2, padding 0); the convs are untouched.
    pools = {int(k): m for k, m in model.model._modules.items() if "Pool" in type(m).__name__}
    assert sorted(pools) == [4, 9, 16, 23, 30]
    for m in pools.values():
        assert type(m) is torch.nn.AvgPool2d
        assert (m.kernel_size, m.stride, m.padding, m.ceil_mode) == (2, 2, 0, False)
    for k, w in enumerate(model.weights):
        np.testing.assert_array_equal(w.numpy().ravel(), piq_ported[f"lin{k}"])


def _cm_piq_lpips(torch, model, a, b, resize):
    """piq's LPIPS as cm/karras_diffusion.py (KarrasDenoiser's losses) calls it on images in
    [−1, 1]: resized to 224 when narrower than 256 (if resize), then mapped to [0, 1]."""
    a, b = (torch.from_numpy(v).permute(0, 3, 1, 2) for v in (a, b))
    if resize and a.shape[-1] < 256:
        a = torch.nn.functional.interpolate(a, size=224, mode="bilinear")
        b = torch.nn.functional.interpolate(b, size=224, mode="bilinear")
    with torch.no_grad():
        return model((a + 1) / 2.0, (b + 1) / 2.0).numpy().reshape(-1)


def test_piq_parity_native_32(torch_piq, piq_ported):
    # As test_parity_native_32: distinct CIFAR-10 test images, then images against themselves
    # plus noise of std 0.1.
    torch, _, model, _ = torch_piq
    x, y = _cifar_pairs(B)
    noisy = np.clip(x + 0.1 * np.random.default_rng(0).standard_normal(x.shape), -1, 1)
    for a, b in ((x, y), (x, noisy.astype(np.float32))):
        ref = _cm_piq_lpips(torch, model, a, b, resize=False)
        ours = distance(piq_ported, a, b, resize_to=None, variant="piq")
        assert _rel_err(ours, ref) < 1e-5, (ours, ref)


def test_piq_parity_resized_224(torch_piq, piq_ported):
    # The PyTorch CM set-up for CIFAR-10: 32 < 256, so both upsampled to 224 before piq.
    torch, _, model, _ = torch_piq
    x, y = _cifar_pairs(2)
    ref = _cm_piq_lpips(torch, model, x, y, resize=True)
    ours = distance(piq_ported, x, y, resize_to=224, variant="piq")
    assert _rel_err(ours, ref) < 1e-5, (ours, ref)


def test_piq_heads_file(torch_piq, piq_ported, tmp_path, capsys):
    # piq's lpips_weights.pt format (a list of five [1, C, 1, 1] tensors) loads as heads, with
    # the trunk from the same VGG16 file; convert says whether they are lpips v0.1's.
    torch = torch_piq[0]
    heads = [torch.from_numpy(piq_ported[f"lin{k}"].reshape(1, -1, 1, 1)) for k in range(5)]
    piq_pt, vgg_npz = str(tmp_path / "lpips_weights.pt"), str(tmp_path / "vgg.npz")
    torch.save(heads, piq_pt)
    L.save_npz({"vgg": piq_ported["vgg"]}, vgg_npz)
    loaded = L.load_lpips_params(vgg_npz, lin_path=piq_pt)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, piq_ported)
    out = str(tmp_path / "out.npz")
    assert L.main(["convert", "--vgg", vgg_npz, "--out", out, "--lin", piq_pt]) == 0
    assert "the lpips v0.1 VGG heads" in capsys.readouterr().out
    torch.save([2 * h for h in heads], piq_pt)
    assert L.main(["convert", "--vgg", vgg_npz, "--out", out, "--lin", piq_pt]) == 0
    assert "differ from lpips v0.1" in capsys.readouterr().out
    torch.save(heads[:4], piq_pt)
    with pytest.raises(L.LPIPSWeightsError, match="holds 4 tensors"):
        L.load_heads(piq_pt)
    torch.save([h.reshape(-1) for h in heads], piq_pt)
    with pytest.raises(L.LPIPSWeightsError, match=r"head 0 has shape \(64,\); .* \[1, 64, 1, 1\]"):
        L.load_heads(piq_pt)
