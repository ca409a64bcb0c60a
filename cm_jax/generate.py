"""Sampling and editing with a trained run, from Python or `launch.py --mode=sample|edit`.

    from cm_jax.generate import Generator
    gen = Generator("workdirs/ict_cpu")                 # newest checkpoint, first eval EMA
    images, labels = gen.sample(64, sigmas=(80.0, 0.821))  # uint8 [64, H, W, C]
    edited = gen.edit("inpainting", images, sigmas=(80.0, 10.0, 1.0), mask="center")

Unset options follow the run's own `config.sample`: its sampler (consistency steps, EDM's
Heun, a PD student's learned steps), `sample.steps` (1, or 2 for the recipe's two-step time
points), σ's or official `ts`.

Samples are sharded over all devices, of every process of a multi-host run; the parameters
live as the run's config.mesh says (split over its fsdp axis, or replicated). Sample i always
comes from the noise of index i (sampling.sample_noise), so the same seed gives the same images
whatever the batch size, the number of devices or of processes. Files are written by process 0.
"""

import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from cm_jax import (
    data,
    distributed,
    editing,
    karras,
    methods,
    metric_logging,
    progress,
    runs,
    sampling,
)
from cm_jax.train_state import batch_sharding, replicated, shardings


class Generator:
    """A run's evaluation EMA, ready to sample and edit."""

    def __init__(self, workdir, step=None, ema_rate=None, devices=None, sample_config=None):
        """The run in `workdir` at checkpoint `step` (None: the newest), its EMA `ema_rate`
        (None: the first). sample_config: a `sample` section to follow instead of the run's.
        devices: where to sample (None: all), on the mesh of the run's own config.mesh."""
        mesh = runs.run_mesh(runs.read_run_config(workdir), devices)
        config, net, state = runs.restore_run(workdir, mesh, step)
        params = runs.ema_params(config, state, ema_rate)
        self._setup(config, net, params, mesh, int(state.step), sample_config)

    @classmethod
    def from_params(cls, config, net, params, mesh, step=0):
        """A generator of parameters in hand (e.g. a training run's EMA, for FID in training)."""
        generator = cls.__new__(cls)
        generator._setup(config, net, params, mesh, step, None)
        return generator

    def _setup(self, config, net, params, mesh, step, sample_config):
        self.config, self.net, self.mesh, self.step = config, net, mesh, step
        self.params = _on_mesh(params, mesh)
        self.sample_config = config.sample if sample_config is None else sample_config
        self.method = methods.of(config)
        self.grid = karras.grid(config.karras)
        size, channels = self.config.data.image_size, self.config.data.num_channels
        self.image_shape = (size, size, channels)

    @property
    def is_diffusion_model(self):
        """An EDM teacher or a PD student: a denoiser, sampled by solving the PF-ODE."""
        return self.method.sampler != "consistency"

    @property
    def pd_learned_steps(self):
        """A PD run's Euler steps at this checkpoint: what its student was trained to take."""
        return int(self.method.learned_steps(self.config, self.step))

    # ------------------------------------------------------------------ time points
    def time_points(self, sigmas=None, ts=None, num_scales=None, steps=None):
        """The σ's of consistency sampling: given directly, or as official `ts` indices into a
        num_scales-point grid; else `steps` (default: the run's sample.steps) — 1: one step from
        σ_max, 2: the recipe's two-step points (sample.two_step_sigmas or two_step_ts)."""
        if ts:
            if not num_scales:
                raise ValueError("ts indices need num_scales, the size of the grid they index.")
            return sampling.sigmas_from_indices(tuple(ts), num_scales, **self.grid)
        if sigmas:
            return sampling.validate_sigmas(
                tuple(sigmas), self.grid["sigma_max"], self.grid["sigma_min"]
            )
        return self._recipe_time_points(steps)

    def _recipe_time_points(self, steps):
        """The run's own time points: its explicit sample.sigmas / ts, else sample.steps."""
        sc = self.sample_config
        if steps is None and (sc.get("sigmas") or sc.get("ts")):
            return self.time_points(sc.get("sigmas"), sc.get("ts"), sc.get("num_scales"), 1)
        steps = int(sc.get("steps", 1) if steps is None else steps)
        if steps == 1:
            return sampling.validate_sigmas((self.grid["sigma_max"],), self.grid["sigma_max"])
        two_sigmas, two_ts = sc.get("two_step_sigmas", ()), sc.get("two_step_ts", ())
        if steps == 2 and (two_sigmas or two_ts):
            return self.time_points(two_sigmas, two_ts, sc.get("num_scales"), 1)
        raise ValueError(
            f"sample.steps={steps}: this run's config has time points for 1 step"
            + (" and 2" if two_sigmas or two_ts else "")
            + "; give others as sample.sigmas=(80.0, …) or sample.ts with sample.num_scales."
        )

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        num,
        sigmas=None,
        ts=None,
        num_scales=None,
        labels=None,
        seed=0,
        batch_size=256,
        edm_steps=None,
        edm_solver=None,
        first_index=0,
        pd_steps=None,
        steps=None,
        clip_denoised=None,
        progress=False,
    ):
        """(uint8 images [num, H, W, C], labels or None): samples first_index … first_index+num−1.

        Consistency models: CM Algorithm 1 over `time_points(sigmas, ts, num_scales, steps)`.
        EDM teachers: the EDM sampler with `edm_steps` steps (`edm_solver` heun or euler,
        `clip_denoised` at every step). PD students: `pd_steps` Euler steps (0: the learned ones).
        Options left None follow `sample_config` (the run's config.sample). labels: class
        labels for a class-conditional model ([num] ints; None draws them). progress: show a
        progress bar.
        """
        labels = self._labels(num, labels, seed, first_index)
        sampler = self.sampler(
            sigmas, ts, num_scales, steps, edm_steps, edm_solver, pd_steps, clip_denoised
        )
        images = self._batched(
            self._compiled(sampler), num, batch_size, seed, labels, first_index, progress
        )
        return images, labels

    def sampler(
        self,
        sigmas=None,
        ts=None,
        num_scales=None,
        steps=None,
        edm_steps=None,
        edm_solver=None,
        pd_steps=None,
        clip_denoised=None,
    ):
        """The sampling.Sampler these options pick; None follows the run's config.sample."""
        sc = self.sample_config
        pick = lambda given, name, default: sc.get(name, default) if given is None else given
        return sampling.sampler_for(
            self.method.sampler,
            sigmas=()
            if self.is_diffusion_model
            else self.time_points(sigmas, ts, num_scales, steps),
            edm_steps=pick(edm_steps, "edm_steps", 18),
            edm_solver=pick(edm_solver, "edm_solver", "heun"),
            pd_steps=int(pick(pd_steps, "pd_steps", 0)) or self.pd_learned_steps,
            clip_denoised=pick(clip_denoised, "clip_denoised", None),
        )

    def _labels(self, num, labels, seed, first_index=0):
        num_classes = self.config.model.num_classes
        if num_classes == 0:
            if labels is not None:
                raise ValueError("This model is unconditional: do not pass class labels.")
            return None
        if labels is None:  # Drawn per sample index, like the noise.
            drawn = np.random.default_rng(seed).integers(0, num_classes, first_index + num)
            return drawn[first_index:].astype(np.int32)
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.shape[0] != num or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must be {num} ints in [0, {num_classes}).")
        return labels

    @functools.lru_cache(maxsize=8)
    def _compiled(self, sampler):
        """The sampler over one batch of sample indices, compiled for this generator's mesh:
        z from each sample's key, the later steps' noise from fold_in(key, n), so one key per
        sample index serves both (and a neighbouring seed never repeats them)."""
        kc = self.config.karras
        scalings = dict(self.grid, sigma_data=kc.sigma_data)

        def fn(params, indices, seed, labels):
            z = sampling.sample_noise(seed, indices, self.image_shape)
            keys = sampling.sample_keys(seed, indices)
            return data.to_uint8(sampler(self.net, params, z, labels, keys, **scalings))

        return self._jit(fn)

    def _jit(self, fn):
        split, whole = batch_sharding(self.mesh), replicated(self.mesh)
        params = jax.tree.map(lambda x: x.sharding, self.params)  # as they live: maybe split
        return jax.jit(fn, in_shardings=(params, split, whole, split), out_shardings=split)

    def _batched(self, fn, num, batch_size, seed, labels, first_index=0, show_progress=False):
        """Run fn over indices first_index… (num of them) in batches padded to a multiple of the
        device count; every process gets all the images."""
        devices = self.mesh.devices.size
        batch_size = max(devices, (batch_size // devices) * devices)
        split, whole = batch_sharding(self.mesh), replicated(self.mesh)
        out = []
        bar = progress.Progress(num, "img", "sampling") if show_progress else None
        try:
            for start in range(0, num, batch_size):
                indices = (first_index + np.arange(start, start + batch_size)).astype(np.int32)
                batch_labels = None
                if labels is not None:
                    batch_labels = distributed.to_global(
                        np.resize(labels[start : start + batch_size], batch_size), split
                    )
                images = fn(
                    self.params,
                    distributed.to_global(indices, split),
                    distributed.to_global(np.int32(seed), whole),
                    batch_labels,
                )
                out.append(distributed.to_host(images)[: num - start])
                if bar is not None:
                    bar.update(len(out[-1]))
        finally:
            if bar is not None:
                bar.close()
        return np.concatenate(out)[:num]

    # ------------------------------------------------------------------ editing
    def edit(self, task, images, sigmas, seed=0, labels=None, **options):
        """Apply editing.TASKS[task] to uint8 images [B, H, W, C] (for "interpolation": a pair
        of latents [2, B, H, W, C], or None to draw them from `seed`). Returns uint8."""
        if self.is_diffusion_model:
            raise ValueError(
                f"Editing needs a consistency model; this run is method "
                f"{self.config.method!r}, a denoiser."
            )
        if task not in editing.TASKS:
            raise ValueError(f"Unknown editing task {task!r}: use one of {sorted(editing.TASKS)}.")
        sigmas = self.time_points(sigmas) if task != "denoising" else np.asarray(sigmas, np.float32)
        kc = self.config.karras
        f = sampling.bind_consistency_fn(
            self.net, self.params, labels, sigma_data=kc.sigma_data, sigma_min=kc.sigma_min
        )
        if task == "interpolation":
            y = images if images is not None else self._latent_pair(seed, options)
        else:
            y = data.normalize(self._check_images(images))
        if task == "inpainting" and isinstance(options.get("mask"), str):
            options["mask"] = editing.MASKS[options["mask"]](self.image_shape[0])
        batch = y.shape[1] if task == "interpolation" else y.shape[0]
        rng = sampling.sample_keys(seed, np.arange(batch))
        whole = replicated(self.mesh)  # Small: every device (of every process) holds it all.
        run = jax.jit(
            lambda y, rng: data.to_uint8(
                editing.TASKS[task](
                    f, y, jnp.asarray(sigmas), rng, sigma_min=kc.sigma_min, **options
                )
            ),
            in_shardings=(whole, whole),
            out_shardings=whole,
        )
        y, rng = (distributed.to_global(np.asarray(v), whole) for v in (y, rng))
        return distributed.to_host(run(y, rng))

    def _check_images(self, images):
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"Images to edit must be [B, {', '.join(map(str, self.image_shape))}]"
                f" to match the model, got {images.shape}."
            )
        if images.dtype != np.uint8:
            raise ValueError(f"Images to edit must be uint8, got {images.dtype}.")
        return images

    def _latent_pair(self, seed, options):
        count = int(options.pop("num_pairs", 1))
        z = sampling.sample_noise(seed, np.arange(2 * count), self.image_shape)
        return jnp.stack([z[:count], z[count:]])


def _on_mesh(params, mesh):
    """params on the mesh's devices: arrays already there keep their shardings (a restored
    run's, split over its fsdp axis, or a training run's EMA), others are placed there by
    train_state.shardings."""
    devices = set(mesh.devices.flat)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return jax.device_put(x, sharding)

    return jax.tree.map(place, params, shardings(params, mesh))


# ---------------------------------------------------------------------- launch.py modes
def run_sample(config, workdir):
    """--mode=sample: config.sample.num_samples images from the run in workdir, sampled as
    config.sample says, written as `samples_NxHxWxC.npz` (arr_0 images uint8, arr_1 labels when
    class-conditional, the layout of the official samplers and evaluators) and a PNG grid of the
    first 64."""
    sample_c = config.sample
    gen = Generator(
        workdir, sample_c.checkpoint_step or None, sample_c.ema_rate or None, None, sample_c
    )
    images, labels = gen.sample(
        sample_c.num_samples, seed=sample_c.seed, batch_size=sample_c.batch_size, progress=True
    )
    out_dir = sample_c.out_dir or epath.Path(workdir) / "samples"
    name = "samples_" + "x".join(str(d) for d in images.shape)
    return _write(
        out_dir, name, images[:64], arr_0=images, **({} if labels is None else {"arr_1": labels})
    )


def run_edit(config, workdir):
    """--mode=edit: config.edit.task on the images of config.edit.images (an npz with `images`
    or `arr_0`, or PNG files: a glob or comma-separated paths). Writes the results as npz and
    a PNG grid whose rows are input | mask or guide | result."""
    edit_c = config.edit
    if edit_c.task not in editing.TASKS:
        raise ValueError(f"edit.task={edit_c.task!r}: use one of {sorted(editing.TASKS)}.")
    # The inputs are read before the model, so a wrong path fails at once.
    images = None if edit_c.task == "interpolation" else load_images(edit_c.images)
    mask_pixels = (
        load_images(edit_c.mask_png)[0] if edit_c.task == "inpainting" and edit_c.mask_png else None
    )
    gen = Generator(workdir, edit_c.checkpoint_step or None, edit_c.ema_rate or None)
    options = _edit_options(edit_c, mask_pixels)
    result = gen.edit(edit_c.task, images, sigmas=tuple(edit_c.sigmas), seed=edit_c.seed, **options)
    out_dir = edit_c.out_dir or epath.Path(workdir) / "edits"
    if edit_c.task == "interpolation":
        grid = result.reshape((-1,) + result.shape[2:])  # One row of frames per pair.
        return _write(out_dir, edit_c.task, grid, columns=result.shape[1], arr_0=result)
    guide = _guide_images(edit_c.task, images, options)
    rows = np.stack([images, guide, result], axis=1).reshape((-1,) + images.shape[1:])
    return _write(out_dir, edit_c.task, rows, columns=3, arr_0=result)


def _edit_options(edit_c, mask_pixels=None):
    if edit_c.task == "inpainting":
        if mask_pixels is not None:
            return {"mask": editing.mask_from_pixels(mask_pixels)}
        return {"mask": edit_c.mask}
    if edit_c.task == "superres":
        return {"factor": edit_c.factor}
    if edit_c.task == "interpolation":
        return {"num_frames": edit_c.num_frames, "num_pairs": edit_c.num_pairs}
    return {}


def _guide_images(task, images, options):
    """What the edit was given besides the image: the masked input, gray, low-res, or as is."""
    x = data.normalize(images)
    if task == "inpainting":
        mask = options["mask"]
        if isinstance(mask, str):
            mask = editing.MASKS[mask](images.shape[1])
        x = x * np.asarray(mask).reshape(mask.shape[0], mask.shape[1], -1)
    elif task == "colorization":
        x = np.repeat(np.asarray(editing.luma(x))[..., None], images.shape[-1], axis=-1)
    elif task == "superres":
        factor = options["factor"]
        x = np.asarray(editing.upsample(editing.downsample(x, factor), factor))
    return np.asarray(data.to_uint8(x))


def load_images(source):
    """uint8 [B, H, W, C] from an npz (`images` or `arr_0`) or PNG files (glob or a,b,c)."""
    if not source:
        raise ValueError("No images given: set --config.edit.images to an npz or PNG files.")
    if source.endswith(".npz"):
        return _npz_images(source)
    paths = sorted(glob.glob(source)) if "*" in source else source.split(",")
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise ValueError(f"Image files not found: {missing or source}")
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except OSError as e:
            raise ValueError(f"{path} is not a readable image ({e}).") from e
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"The images differ in size: {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def _npz_images(path):
    """The `images` (or `arr_0`) array of an npz, with one error naming a missing or damaged
    file (never an invitation to load pickles)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist (config.edit.images).")
    try:
        with np.load(path, allow_pickle=False) as f:
            key = "images" if "images" in f.files else "arr_0"
            if key not in f.files:
                raise ValueError(f"{path} has neither `images` nor `arr_0` (it has {f.files}).")
            return f[key]
    except ValueError:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError, …: a damaged file.
        raise ValueError(
            f"{path} is not a readable npz file ({type(e).__name__}); is it damaged?"
        ) from e


def _write(out_dir, name, grid_images, columns=None, **arrays):
    """The arrays as `name`.npz and a grid as `name`.png in out_dir; by process 0 only."""
    out_dir = epath.Path(out_dir)
    npz_path, png_path = out_dir / f"{name}.npz", out_dir / f"{name}.png"
    if distributed.is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        with npz_path.open("wb") as f:
            np.savez(f, **arrays)
        metric_logging.save_image_grid(grid_images, png_path, columns)
        logging.info("Wrote %s and %s", npz_path, png_path)
    return str(npz_path), str(png_path)
