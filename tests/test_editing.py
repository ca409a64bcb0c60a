"""Zero-shot editing (CM Algorithm 4): what each task promises to keep is kept to float precision,
the bases are orthogonal, the shared mechanism reduces to Algorithm 1, and misuse is named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import tiny_model

from cm_jax import editing, sampling

SIZE = 16
SHAPE = (SIZE, SIZE, 3)
SIGMAS = [80.0, 0.8]


@pytest.fixture(scope="module")
def model():
    return tiny_model(SHAPE)


@pytest.fixture(scope="module")
def f(model):
    return sampling.bind_consistency_fn(*model)


def _images(indices, seed=3):
    """Smooth-ish reference images in [−1, 1] and one key per sample."""
    z = sampling.sample_noise(seed, jnp.asarray(indices), SHAPE)
    return jnp.tanh(z), sampling.sample_keys(seed + 1, jnp.asarray(indices))


def _run(task, f, y, keys, **options):
    fn = jax.jit(lambda y, k: editing.TASKS[task](f, y, SIGMAS, k, **options))
    return fn(y, keys)


# ---------------------------------------------------------------------------- bases
@pytest.mark.parametrize(
    "basis", [editing.luma_basis(), editing.patch_basis(2), editing.patch_basis(4)]
)
def test_bases_are_orthogonal(basis):
    n = basis.shape[0]
    np.testing.assert_allclose(basis.T @ basis, np.eye(n), atol=1e-6)
    np.testing.assert_allclose(basis @ basis.T, np.eye(n), atol=1e-6)
    assert np.all(basis[:, 0] > 0)  # the known axis points along its vector, not against it


def test_basis_first_axes():
    luma = np.asarray(editing.LUMA)
    np.testing.assert_allclose(editing.luma_basis()[:, 0], luma / np.linalg.norm(luma), atol=1e-7)
    np.testing.assert_allclose(editing.patch_basis(4)[:, 0], np.full(16, 0.25), atol=1e-7)


def test_patches_round_trip_and_means():
    x, _ = _images(range(2))
    np.testing.assert_array_equal(editing.from_patches(editing.to_patches(x, 4), 4), x)
    low = editing.downsample(x, 4)
    assert low.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(low[1, 2, 3], x[1, 8:12, 12:16].mean(axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(editing.downsample(editing.upsample(low, 4), 4), low, atol=1e-6)


# ---------------------------------------------------------------------------- the tasks
def test_inpainting_keeps_the_known_pixels_exactly(f):
    y, keys = _images(range(3))
    mask = editing.center_square_mask(SIZE)
    out = _run("inpainting", f, y, keys, mask=mask)
    known = np.broadcast_to(mask[None, :, :, None] == 1, out.shape)
    np.testing.assert_array_equal(np.asarray(out)[known], np.asarray(y)[known])
    assert np.abs(np.asarray(out - y)[~known]).mean() > 0.05  # the hole was generated
    assert mask.sum() == SIZE * SIZE * 3 / 4 and mask[SIZE // 2, SIZE // 2] == 0


def test_masks():
    np.testing.assert_array_equal(editing.left_half_mask(4)[:, :2], 0)
    np.testing.assert_array_equal(editing.left_half_mask(4)[:, 2:], 1)
    box = editing.box_mask((4, 6), 1, 2, 3, 5)
    assert box.sum() == 24 - 6 and box[1, 2] == 0 and box[0, 2] == 1 and box[1, 5] == 1
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[:2] = 255
    np.testing.assert_array_equal(editing.mask_from_pixels(pixels)[:, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(editing.mask_from_pixels(pixels, invert=True)[:, 0], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="outside the 4×6 image"):
        editing.box_mask((4, 6), 0, 0, 5, 2)


def test_colorization_keeps_the_luma_exactly(f):
    y, keys = _images(range(3))
    out = _run("colorization", f, y, keys)
    np.testing.assert_allclose(editing.luma(out), editing.luma(y), atol=2e-6)
    # From a grayscale input (R = G = B = g) the luma is g·Σw; the colours are new.
    gray = y[..., :1]
    out = _run("colorization", f, gray, keys)
    np.testing.assert_allclose(editing.luma(out), gray[..., 0] * sum(editing.LUMA), atol=2e-6)
    assert float(jnp.std(out - out.mean(axis=-1, keepdims=True))) > 0.01


@pytest.mark.parametrize("factor", [2, 4])
def test_superres_keeps_the_patch_means_exactly(f, factor):
    x, keys = _images(range(2))
    y = editing.upsample(editing.downsample(x, factor), factor)
    out = _run("superres", f, y, keys, factor=factor)
    np.testing.assert_allclose(
        editing.downsample(out, factor), editing.downsample(x, factor), atol=2e-6
    )
    assert float(jnp.abs(out - y).mean()) > 0.01  # detail was generated inside the patches


def test_edit_with_nothing_known_is_multistep_sampling(model, f):
    """Ω = 0: Algorithm 4 starts from 0 + σ_0·z_0 and replaces nothing, which is Algorithm 1."""
    net, params = model
    y, keys = _images(range(2))
    identity = lambda x: x
    edit = jax.jit(
        lambda y, k: editing.iterative_edit(
            f, y, SIGMAS, identity, identity, jnp.zeros((1,) + SHAPE), k
        )
    )
    out = edit(y, keys)
    z0 = sampling.step_noise(sampling.per_sample_keys(keys, 2), 0, SHAPE)
    want = jax.jit(lambda z, k: sampling.multistep_sample(net, params, z, SIGMAS, noise_rng=k))(
        z0, keys
    )
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_edits_do_not_depend_on_the_batch(f):
    y, keys = _images(range(4))
    mask = editing.left_half_mask(SIZE)
    whole = _run("inpainting", f, y, keys, mask=mask)
    part = _run("inpainting", f, y[1:3], keys[1:3], mask=mask)
    np.testing.assert_allclose(part, whole[1:3], atol=1e-6)


def test_stroke_edit_starts_from_the_guide(model, f):
    """At σ_start = σ_min the consistency function is the identity (CM §3), so the result is the
    guide plus σ_min·z: within 0.01 of it. From higher it is a new image."""
    y, keys = _images(range(2))
    near = editing.stroke_edit(f, y, [0.002], keys)
    np.testing.assert_allclose(near, y, atol=0.01)
    far = editing.stroke_edit(f, y, [5.0, 0.5], keys)
    assert float(jnp.abs(far - y).mean()) > 0.05


def test_denoising_is_one_consistency_step(model, f):
    y, _ = _images(range(2))
    np.testing.assert_array_equal(editing.denoise(f, y, [0.002]), jnp.clip(y, -1, 1))
    noisy = y + 0.5 * sampling.sample_noise(9, jnp.arange(2), SHAPE)
    np.testing.assert_allclose(
        editing.denoise(f, noisy, [0.5]), jnp.clip(f(noisy, 0.5), -1, 1), atol=1e-6
    )


def test_interpolation_frames_and_endpoints(model, f):
    net, params = model
    z1 = sampling.sample_noise(1, jnp.arange(2), SHAPE)
    z2 = sampling.sample_noise(2, jnp.arange(2), SHAPE)
    _, keys = _images(range(2))
    frames = jax.jit(lambda a, b, k: editing.interpolate(f, (a, b), SIGMAS, k, num_frames=4))(
        z1, z2, keys
    )
    assert frames.shape == (2, 4) + SHAPE
    for end, z in ((0, z1), (-1, z2)):
        want = sampling.multistep_sample(net, params, z, SIGMAS, noise_rng=keys)
        np.testing.assert_allclose(frames[:, end], want, atol=1e-5)
    # slerp keeps Gaussian latents on their shell: the midpoint norm stays ≈ √d, not √(d/2).
    mid = editing.slerp(z1, z2, 0.5)
    np.testing.assert_allclose(
        jnp.linalg.norm(mid.reshape(2, -1), axis=1),
        jnp.linalg.norm(z1.reshape(2, -1), axis=1),
        rtol=0.1,
    )
    np.testing.assert_allclose(editing.slerp(z1, z2, 0.0), z1, atol=1e-5)


# ---------------------------------------------------------------------------- misuse
def test_mismatched_sizes_are_named(f):
    y, keys = _images(range(2))
    with pytest.raises(ValueError, match="the mask is 8×8 but the images are 16×16"):
        editing.inpaint(f, y, SIGMAS, keys, mask=editing.center_square_mask(8))
    with pytest.raises(ValueError, match="do not split into 3×3 patches"):
        editing.superres(f, y, SIGMAS, keys, factor=3)
    with pytest.raises(ValueError, match="RGB or grayscale"):
        editing.colorize(f, jnp.zeros((2, SIZE, SIZE, 2)), SIGMAS, keys)
    with pytest.raises(ValueError, match="differ in shape"):
        editing.interpolate(f, (y, y[:1]), SIGMAS, keys, num_frames=3)
    with pytest.raises(ValueError, match=r"image batch \[B, H, W, C\]"):
        editing.colorize(f, y[0], SIGMAS, keys)
    with pytest.raises(ValueError, match="one key per sample"):
        editing.inpaint(f, y, SIGMAS, keys[:1], mask=editing.left_half_mask(SIZE))


def test_bad_masks_and_time_points_are_named(f):
    y, keys = _images(range(2))
    with pytest.raises(ValueError, match="only 0 .* and 1"):
        editing.inpaint(f, y, SIGMAS, keys, mask=np.full((SIZE, SIZE), 0.5))
    identity = lambda x: x
    with pytest.raises(ValueError, match="does not fit"):
        editing.iterative_edit(f, y, SIGMAS, identity, identity, np.ones((SIZE, 5)), keys)
    with pytest.raises(ValueError, match="strictly decreasing"):
        editing.colorize(f, y, [0.8, 80.0], keys)
    with pytest.raises(ValueError, match="≥ σ_min"):
        editing.stroke_edit(f, y, [1.0, 0.001], keys)
