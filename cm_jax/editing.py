"""Zero-shot image editing with a consistency model (CM paper §6.3 and Algorithm 4).

One mechanism does it all: `iterative_edit` runs multistep consistency sampling (CM Algorithm 1)
and, after every step, writes the known components of a linear transform of the reference
image y into the sample: x ← A⁻¹[A y ⊙ Ω + A x ⊙ (1 − Ω)], with Ω = 1 on the known components
(the paper's Ω marks the unknown ones; here `mask` = 1 means *known*). A is orthogonal, so the
known components are kept to float precision and the rest are left to the model:

    task          A                                       known (mask = 1)
    inpainting    identity                                the pixels outside the hole
    colorization  per pixel, a 3×3 basis Q, Q[:, 0] ∝ luma  the luma axis
    super-res     per f×f patch, a basis whose first axis   the patch means
                  is the constant patch

Two more edits need no replacement: stroke-guided editing (SDEdit: noise the guide to σ_start
and denoise from there) and denoising (start at the image's own noise level). Interpolation
slerps between two latents and samples from each.

Every task is a pure function `task(consistency_fn, y, sigmas, rng, *, sigma_min, clip, ...)`
(`TASKS`) that a caller jits; consistency_fn(x, σ) is f_θ with the network bound
(`sampling.bind_consistency_fn`); rng holds one key per sample (`sampling.sample_keys`), so an
edit depends on the sample's index only. Images are NHWC in [−1, 1].
"""

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import sampling

LUMA = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 weights, as the official colorization code.

# ----------------------------------------------------------------------------------------
# The shared mechanism: CM Algorithm 4
# ----------------------------------------------------------------------------------------


def iterative_edit(
    consistency_fn, y, sigmas, transform, inverse, mask, rng, sigma_min=0.002, clip=True
):
    """CM Algorithm 4: multistep sampling with the known part of transform(y) put back each step.

    transform / inverse: an invertible linear map A and its inverse on image batches; mask: 1 on
    the known components of A(y) (broadcastable to A(y)'s shape), 0 on those to generate.
    The start is x ~ N(y_known, σ_0²I), y_known = A⁻¹[A y ⊙ Ω] (Algorithm 4, lines 1-2).
    """
    _check_images(y, "y")
    sigmas = sampling.time_points(sigmas, None, sigma_min)
    a_y = transform(y)
    mask = _check_mask(mask, a_y.shape)
    known = a_y * mask

    def replace(x0):
        return inverse(known + transform(x0) * (1.0 - mask))

    keys = sampling.per_sample_keys(rng, y.shape[0])
    x = inverse(known) + sigmas[0] * sampling.step_noise(keys, 0, y.shape[1:])
    return sampling.consistency_steps(
        consistency_fn, x, sigmas, keys, sigma_min=sigma_min, clip=clip, project=replace
    )


def _check_images(x, name):
    if jnp.ndim(x) != 4:
        raise ValueError(f"{name} must be an image batch [B, H, W, C], got shape {jnp.shape(x)}")


def _check_mask(mask, shape):
    """The mask as float32, after checking it broadcasts to `shape` and is 0/1 when concrete."""
    mask = jnp.asarray(mask, jnp.float32)
    try:
        fits = jnp.broadcast_shapes(mask.shape, shape) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask of shape {mask.shape} does not fit the transformed images of shape {shape}"
        )
    try:
        values = np.asarray(mask)
    except jax.errors.TracerArrayConversionError:
        return mask
    if not np.all((values == 0) | (values == 1)):
        raise ValueError("mask must hold only 0 (generate) and 1 (known)")
    return mask


# ----------------------------------------------------------------------------------------
# Orthogonal bases
# ----------------------------------------------------------------------------------------


def orthonormal_basis(v):
    """An orthogonal matrix Q (float32) with Q[:, 0] = v/‖v‖: Gram-Schmidt (QR) of [v, e_2, …].

    Coefficients c = Qᵀx then hold the component of x along v in c[0]; QᵀQ = I.
    """
    v = np.asarray(v, np.float64)
    if v.ndim != 1 or v[0] == 0:
        raise ValueError(f"need a 1-D vector with a non-zero first entry, got {v}")
    basis = np.eye(v.size)
    basis[:, 0] = v / np.linalg.norm(v)
    q, _ = np.linalg.qr(basis)
    q[:, 0] *= np.sign(q[:, 0] @ v)  # QR fixes the axis up to its sign.
    return q.astype(np.float32)


def luma_basis():
    """The 3×3 colour basis of colorization: first axis along the luma weights."""
    return orthonormal_basis(LUMA)


def patch_basis(factor):
    """The (f²)×(f²) basis of super-resolution: first axis the constant patch (its mean)."""
    return orthonormal_basis(np.ones(factor * factor))


# ----------------------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------------------


def _size(image_size):
    return (image_size, image_size) if np.ndim(image_size) == 0 else tuple(image_size)


def box_mask(image_size, top, left, bottom, right):
    """A pixel mask [H, W] (1 = known) with the hole rows top:bottom, columns left:right."""
    height, width = _size(image_size)
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(
            f"box (top={top}, left={left}, bottom={bottom}, right={right}) is "
            f"empty or outside the {height}×{width} image"
        )
    mask = np.ones((height, width), np.float32)
    mask[top:bottom, left:right] = 0.0
    return mask


def center_square_mask(image_size):
    """The hole is the central square of half the side (a quarter of the image)."""
    height, width = _size(image_size)
    return box_mask(
        (height, width), height // 4, width // 4, height - height // 4, width - width // 4
    )


def left_half_mask(image_size):
    """The hole is the left half: the model completes the image from its right half."""
    height, width = _size(image_size)
    return box_mask((height, width), 0, 0, height, width // 2)


MASKS = {"center": center_square_mask, "left_half": left_half_mask}


def mask_from_pixels(pixels, invert=False):
    """A pixel mask from an image read by the caller (e.g. a PNG through Pillow), as is:
    white (≥ half range) = 1 = known, black = generate; `invert` for the other convention.
    uint8 [H, W] or [H, W, C] (channels averaged) -> float32 [H, W]."""
    pixels = np.asarray(pixels, np.float32)
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=-1)
    if pixels.ndim != 2:
        raise ValueError(f"a mask image must be [H, W] or [H, W, C], got shape {pixels.shape}")
    mask = (pixels >= 127.5).astype(np.float32)
    return 1.0 - mask if invert else mask


def _pixel_mask(mask, images_shape):
    """[H, W], [H, W, C] or [B, H, W, C] -> rank 4, after checking H×W against the images."""
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == 2:
        mask = mask[..., None]
    if mask.ndim == 3:
        mask = mask[None]
    if mask.ndim != 4 or mask.shape[1:3] != tuple(images_shape[1:3]):
        raise ValueError(
            f"the mask is {'×'.join(map(str, mask.shape[1:3]))} but the images are "
            f"{images_shape[1]}×{images_shape[2]} (mask shape {mask.shape})"
        )
    return mask


def inpaint(consistency_fn, y, sigmas, rng, *, mask, sigma_min=0.002, clip=True):
    """Fill the pixels where mask = 0 (`box_mask`, `MASKS`, `mask_from_pixels`); the others
    are y's exactly."""
    _check_images(y, "y")
    identity = lambda x: x
    return iterative_edit(
        consistency_fn,
        y,
        sigmas,
        identity,
        identity,
        _pixel_mask(mask, y.shape),
        rng,
        sigma_min,
        clip,
    )


# ----------------------------------------------------------------------------------------
# Colorization
# ----------------------------------------------------------------------------------------


def luma(x):
    """The luma channel Σ_c w_c·x_c of images [..., 3]."""
    return x @ jnp.asarray(LUMA, jnp.float32)


def colorize(consistency_fn, y, sigmas, rng, *, sigma_min=0.002, clip=True):
    """Generate the colours of y keeping its luma: y is RGB [B, H, W, 3] (only its luma is used)
    or grayscale [B, H, W, 1] (taken as R = G = B)."""
    _check_images(y, "y")
    if y.shape[-1] not in (1, 3):
        raise ValueError(f"colorization needs RGB or grayscale images, got {y.shape[-1]} channels")
    y = jnp.broadcast_to(y, y.shape[:-1] + (3,))
    q = jnp.asarray(luma_basis())
    mask = jnp.asarray([1.0, 0.0, 0.0])
    return iterative_edit(
        consistency_fn, y, sigmas, lambda x: x @ q, lambda c: c @ q.T, mask, rng, sigma_min, clip
    )


# ----------------------------------------------------------------------------------------
# Super-resolution
# ----------------------------------------------------------------------------------------


def _check_factor(shape, factor):
    if int(factor) != factor or factor < 1:
        raise ValueError(f"the super-resolution factor must be a positive integer, got {factor}")
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(
            f"images of {shape[1]}×{shape[2]} pixels do not split into {factor}×{factor} patches"
        )


def to_patches(x, factor):
    """[B, H, W, C] -> [B, H/f, W/f, C, f²]: each f×f patch of each channel as a vector."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c, factor**2)


def from_patches(p, factor):
    """Inverse of `to_patches`."""
    b, hp, wp, c, _ = p.shape
    p = p.reshape(b, hp, wp, c, factor, factor)
    return p.transpose(0, 1, 4, 2, 5, 3).reshape(b, hp * factor, wp * factor, c)


def downsample(x, factor):
    """Patch means: [B, H, W, C] -> [B, H/f, W/f, C], the low-resolution image."""
    _check_factor(x.shape, factor)
    return to_patches(x, factor).mean(axis=-1)


def upsample(x_low, factor):
    """Nearest-neighbour upsampling: each low-resolution pixel becomes an f×f patch."""
    return jnp.repeat(jnp.repeat(x_low, factor, axis=1), factor, axis=2)


def superres(consistency_fn, y, sigmas, rng, *, factor, sigma_min=0.002, clip=True):
    """Generate the detail inside each factor×factor patch keeping the patch means of y.

    y is at the output resolution; only its patch means are used (pass a low-resolution image
    through `upsample`).
    """
    _check_images(y, "y")
    _check_factor(y.shape, factor)
    q = jnp.asarray(patch_basis(factor))
    mask = jnp.zeros((factor**2,)).at[0].set(1.0)
    transform = lambda x: to_patches(x, factor) @ q
    inverse = lambda c: from_patches(c @ q.T, factor)
    return iterative_edit(consistency_fn, y, sigmas, transform, inverse, mask, rng, sigma_min, clip)


# ----------------------------------------------------------------------------------------
# Edits without replacement
# ----------------------------------------------------------------------------------------


def stroke_edit(consistency_fn, y, sigmas, rng, *, sigma_min=0.002, clip=True):
    """Stroke-guided editing (SDEdit style): x = y + σ_start·z with σ_start = sigmas[0] (well
    below σ_max, so the guide's layout survives), then consistency steps; nothing replaced."""
    _check_images(y, "y")
    sigmas = sampling.time_points(sigmas, None, sigma_min)
    keys = sampling.per_sample_keys(rng, y.shape[0])
    x = y + sigmas[0] * sampling.step_noise(keys, 0, y.shape[1:])
    return sampling.consistency_steps(
        consistency_fn, x, sigmas, keys, sigma_min=sigma_min, clip=clip
    )


def denoise(consistency_fn, y, sigmas, rng=None, *, sigma_min=0.002, clip=True):
    """y is noisy at σ = sigmas[0]: f_θ(y, σ) in one step; more time points refine it as
    multistep sampling does (and then need rng)."""
    _check_images(y, "y")
    sigmas = sampling.time_points(sigmas, None, sigma_min)
    return sampling.consistency_steps(
        consistency_fn, y, sigmas, rng, sigma_min=sigma_min, clip=clip
    )


def slerp(z1, z2, alpha):
    """Spherical interpolation per sample: sin((1−α)θ)/sin θ·z1 + sin(αθ)/sin θ·z2, θ the
    angle between the flattened z1 and z2 (linear where they are nearly parallel)."""
    axes = tuple(range(1, z1.ndim))
    dot = jnp.sum(z1 * z2, axes) / jnp.sqrt(jnp.sum(z1**2, axes) * jnp.sum(z2**2, axes))
    theta = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    parallel = jnp.sin(theta) < 1e-6
    sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
    w1 = jnp.where(parallel, 1.0 - alpha, jnp.sin((1.0 - alpha) * theta) / sin_theta)
    w2 = jnp.where(parallel, alpha, jnp.sin(alpha * theta) / sin_theta)
    shape = (-1,) + (1,) * (z1.ndim - 1)
    return w1.reshape(shape) * z1 + w2.reshape(shape) * z2


def interpolate(
    consistency_fn, latents, sigmas, rng=None, *, num_frames, sigma_min=0.002, clip=True
):
    """latents = (z1, z2), each [B, H, W, C] ~ N(0, I): num_frames images along the slerp from
    z1 to z2, each sampled from σ_0·z_α with CM Algorithm 1 -> [B, num_frames, H, W, C].

    All frames of a sample share its step noise, so only the latent moves between frames.
    Frames run one after the other (lax.map): memory stays that of one batch.
    """
    z1, z2 = latents
    _check_images(z1, "z1")
    if jnp.shape(z1) != jnp.shape(z2):
        raise ValueError(f"the two latents differ in shape: {jnp.shape(z1)} vs {jnp.shape(z2)}")
    if num_frames < 2:
        raise ValueError(f"interpolation needs num_frames ≥ 2, got {num_frames}")
    sigmas = sampling.time_points(sigmas, None, sigma_min)

    def frame(alpha):
        z = slerp(z1, z2, alpha)
        return sampling.consistency_steps(
            consistency_fn, sigmas[0] * z, sigmas, rng, sigma_min=sigma_min, clip=clip
        )

    frames = jax.lax.map(frame, jnp.linspace(0.0, 1.0, num_frames))
    return jnp.swapaxes(frames, 0, 1)


# Name -> task; each is task(consistency_fn, y, sigmas, rng, *, sigma_min, clip, **options):
#   inpainting: mask=;  superres: factor=;  interpolation: y = (z1, z2), num_frames=.
TASKS = {
    "inpainting": inpaint,
    "colorization": colorize,
    "superres": superres,
    "stroke": stroke_edit,
    "interpolation": interpolate,
    "denoising": denoise,
}
