"""Image datasets read from local files or tfds.

Training data for the image generators (CIFAR-10, ImageNet-64, LSUN-256).

The module reads top to bottom:

1. Pixel conversion: `normalize` / `to_uint8`, shared with sampling and FID code. Every
   training batch comes out as float32 images in [-1, 1] (NHWC) and int32 labels.
2. The datasets and `load_split`. A dataset is anything with `num_examples`, `image_shape`
   and `gather(indices) -> (uint8 images, int32 labels)` (`Dataset`). Small splits are read
   whole into memory (`ImageDataset`) from npz shards or a folder of image files
   (`config.data.dir`) or, when that is empty, from tfds. A split converted to ArrayRecord
   shards by `python -m cm_jax.convert_data` (ImageNet-64 is 15.7 GB as uint8, LSUN bedroom
   at 256² 596 GB: too large to hold in every process) is streamed instead: each process
   reads and decodes only the rows it feeds (`cm_jax/data_arrayrecord.py`). Every layout
   problem raises one error that names the file, before training starts.

The order in which a run sees the examples, and the iterator that puts its batches on the
devices, are in input_pipeline.py.

TensorFlow and tensorflow_datasets are imported only on the tfds path, and grain and
array_record only on the ArrayRecord path: training from npz shards needs none of them (the
GPU machines do not have TensorFlow).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import zipfile
import zlib
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------
# Pixel conversion
# ----------------------------------------------------------------------------------------


def _array_module(x):
    """jax.numpy for jax arrays (including tracers inside jit), numpy for everything else."""
    return jnp if isinstance(x, jax.Array) else np


def normalize(images_uint8):
    """uint8 pixels 0..255 -> float32 in [-1, 1], the range the models are trained on."""
    if _array_module(images_uint8) is jnp:
        return jnp.asarray(images_uint8).astype(jnp.float32) / 127.5 - 1.0
    # The same arithmetic in one allocation: the input thread runs this on every batch.
    images = np.divide(images_uint8, np.float32(127.5), dtype=np.float32)
    images -= 1.0
    return images


def to_uint8(images_float):
    """Inverse of `normalize`: round to the nearest level and clip, for image grids and FID.

    Model samples overshoot [-1, 1] a little; clipping keeps them valid pixels instead of
    letting the uint8 cast wrap around.
    """
    xp = _array_module(images_float)
    pixels = xp.round((xp.asarray(images_float) + 1.0) * 127.5)
    return xp.clip(pixels, 0, 255).astype(xp.uint8)


# ----------------------------------------------------------------------------------------
# The datasets
# ----------------------------------------------------------------------------------------


class Dataset(Protocol):
    """What input_pipeline.py (`host_batch`, `TrainIterator`) and the statistics code read
    from a dataset: `ImageDataset` (in memory) and `data_arrayrecord.ArrayRecordDataset`
    (streamed)."""

    @property
    def num_examples(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, H, W, C], labels int32 [n]) of examples `indices`, as fresh
        arrays the caller may modify."""
        ...


def check_arrays(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Raise one ValueError naming the first problem with an (images, labels) pair."""
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(
            f"{source}: images must be 4-D [N, H, W, C] (NHWC), got shape {images.shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be a 1-D integer array, got shape {labels.shape} "
            f"and dtype {labels.dtype}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{source}: length mismatch: {len(images)} images but {len(labels)} labels"
        )


def check_image_shape(image_shape: tuple, image_size: int, num_channels: int, source: str):
    """Raise if images are not [image_size, image_size, num_channels] as the config says,
    naming the flag that would make the config match the data."""
    height, width, channels = image_shape
    if (height, width) != (image_size, image_size):
        remedy = (
            f"set --config.data.image_size={height} (or use the matching data)"
            if height == width
            else "the models need square images: convert the data with "
            f"python -m cm_jax.convert_data --image_size={image_size}"
        )
        raise ValueError(
            f"{source}: image size is {height}x{width}, but config.data.image_size is "
            f"{image_size}: {remedy}"
        )
    if channels != num_channels:
        raise ValueError(
            f"{source}: images have {channels} channels, but config.data.num_channels is "
            f"{num_channels}: set --config.data.num_channels={channels} (or use the matching "
            "data)"
        )


def check_num_classes(num_classes_in_data: int, num_classes: int | None, source: str):
    """Raise if a class-conditional model (`config.model.num_classes` > 0) would be trained
    on unlabelled data, or on labels beyond its classes; unconditional models ignore labels.
    (Fewer classes in the data is allowed: a subset, or npz data, whose class count is its
    largest label + 1.)"""
    if not num_classes:
        return
    if num_classes_in_data == 0:
        raise ValueError(
            f"{source}: the data has no class labels, but config.model.num_classes is "
            f"{num_classes}: set --config.model.num_classes=0 (or use labelled data)"
        )
    if num_classes_in_data > num_classes:
        raise ValueError(
            f"{source}: the data has {num_classes_in_data} classes, but "
            f"config.model.num_classes is {num_classes}: set "
            f"--config.model.num_classes={num_classes_in_data} (or use the matching data)"
        )


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A whole split in host memory: `images` uint8 [N, H, W, C], `labels` int32 [N].

    The arrays are made read-only: batches are gathered copies, so nothing downstream
    can corrupt the data the next batch is drawn from.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        check_arrays(images, labels, "ImageDataset")
        images, labels = images.view(), labels.astype(np.int32)  # read-only views/copies,
        images.flags.writeable = False  # leaving the caller's own arrays writable
        labels.flags.writeable = False
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.images.shape[1:])

    def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Examples `indices` as new arrays (fancy indexing copies)."""
        return self.images[indices], self.labels[indices]


def load_split(data_config, num_classes: int | None = None) -> Dataset:
    """The split `data_config.split`, checked against the config.

    `data_config` is `config.data`. With `dir` set, the split comes from, in this order:
    ArrayRecord shards with their metadata (`{split}.metadata.json`, written by
    `python -m cm_jax.convert_data`), streamed rather than loaded; npz shards in that folder
    (see `npz_split_files`); or, where it has none, image files (`image_folder`). With `dir`
    empty, from `tfds.load(dataset)`, materialised whole through TensorFlow, which suits
    CIFAR-sized data; convert larger datasets once with `cm_jax.convert_data`.

    `num_classes` is `config.model.num_classes`: when positive, the data must have that many
    classes (checked for converted data, whose metadata records its classes, and as
    "labels < num_classes" for the rest). Nothing on disk is written.
    """
    image_size, num_channels = int(data_config.image_size), int(data_config.num_channels)
    if data_config.dir and _has_arrayrecord_split(data_config.dir, data_config.split):
        from cm_jax import data_arrayrecord  # Only this path needs grain and array_record.

        return data_arrayrecord.open_split(data_config, num_classes)
    folder = image_folder(data_config.dir, data_config.split) if data_config.dir else None
    if folder:
        images, labels = _load_image_folder(folder, image_size, num_channels)
        source = f"image folder {folder}"
    elif data_config.dir:
        images, labels = _load_npz_split(
            data_config.dir, data_config.split, image_size, num_channels
        )
        source = f"{data_config.dir} split {data_config.split!r}"
    else:
        images, labels = _load_tfds_split(
            data_config.dataset, data_config.split, getattr(data_config, "tfds_data_dir", "")
        )
        source = f"tfds {data_config.dataset!r} split {data_config.split!r}"
        check_arrays(images, labels, source)
    check_image_shape(images.shape[1:], image_size, num_channels, source)
    if num_classes and len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(
            f"{source}: labels go up to {int(labels.max())}, but config.model.num_classes is "
            f"{num_classes}: set --config.model.num_classes={int(labels.max()) + 1} (or use "
            "the matching data)"
        )
    return ImageDataset(images=images, labels=labels)


# File names of a split converted by `cm_jax.convert_data`: shards
# `{split}-00000-of-00128.array_record` (read in the order the metadata lists them) and
# `{split}.metadata.json`, which says what they hold.
ARRAYRECORD_SUFFIX = ".array_record"


def arrayrecord_metadata_path(folder: str, split: str) -> str:
    return os.path.join(folder, f"{split}.metadata.json")


def arrayrecord_shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{ARRAYRECORD_SUFFIX}"


def _has_arrayrecord_split(folder: str, split: str) -> bool:
    """Whether `folder` holds `split` as ArrayRecord: its metadata file, or shards without
    one (an unfinished conversion, which `data_arrayrecord.open_split` reports)."""
    pattern = os.path.join(glob.escape(folder), f"{split}-*{ARRAYRECORD_SUFFIX}")
    return os.path.isfile(arrayrecord_metadata_path(folder, split)) or bool(glob.glob(pattern))


def npz_split_files(folder: str, split: str) -> list[str]:
    """The npz files holding `split`, in the order their examples are concatenated.

    A split is either sharded (`{split}-*.npz`, e.g. `train-00000-of-00005.npz`, read in
    name order) or one file (`{split}.npz`, e.g. `test.npz`). Both at once would be read
    twice over, so that is an error rather than a guess.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder!r} (config.data.dir) does not exist")
    shards = sorted(glob.glob(os.path.join(glob.escape(folder), f"{split}-*.npz")))
    single = os.path.join(folder, f"{split}.npz")
    if shards and os.path.isfile(single):
        raise ValueError(
            f"data folder {folder!r} holds both {split}.npz and {split}-*.npz shards for "
            f"split {split!r}; keep one layout"
        )
    if shards:
        return shards
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(
        f"no shards for split {split!r} in data folder {folder!r}: expected {split}-*.npz "
        f"or {split}.npz, or image files in {os.path.join(folder, split)} or in the folder"
    )


# Pillow reads these; the folder layout follows torchvision's ImageFolder.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: str) -> list[str]:
    """Image files under `folder` (recursively), sorted by path."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def image_folder(folder: str, split: str) -> str | None:
    """The image folder holding `split`: `folder/split` if it has images, else `folder` itself
    when it has images and no npz shards; None for an npz layout (or nothing usable)."""
    if not os.path.isdir(folder) or glob.glob(os.path.join(glob.escape(folder), "*.npz")):
        return None
    for candidate in (os.path.join(folder, split), folder):
        if os.path.isdir(candidate) and image_files(candidate):
            return candidate
    return None


def image_folder_labels(folder: str, files: list[str]) -> tuple[np.ndarray, list[str]]:
    """(labels int32, class names) of image `files` under `folder`. Images directly in the
    folder get label 0 and there are no classes; with class subfolders (`folder/<class>/…`,
    as ImageNet), the label is the class's index in the sorted subfolder names."""
    relative = [os.path.relpath(path, folder) for path in files]
    classes = sorted({r.split(os.sep)[0] for r in relative if os.sep in r})
    loose = [r for r in relative if os.sep not in r]
    if classes and loose:
        raise ValueError(
            f"image folder {folder!r} mixes images at its top ({loose[0]}) with "
            f"class subfolders ({classes[0]}/…); use one layout"
        )
    index = {name: k for k, name in enumerate(classes)}
    labels = np.array([index[r.split(os.sep)[0]] if classes else 0 for r in relative], np.int32)
    return labels, classes


def _load_image_folder(
    folder: str, image_size: int, num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """All image files under `folder` as uint8 NHWC, in path order, labelled by
    `image_folder_labels`. Images are not resized: one of another size is an error naming
    the file."""
    from PIL import Image  # Only the image-folder path needs Pillow.

    files = image_files(folder)
    labels, _ = image_folder_labels(folder, files)
    mode = {1: "L", 3: "RGB"}.get(num_channels)
    if mode is None:
        raise ValueError(
            f"image folder {folder!r}: images can be read with 1 or 3 channels, "
            f"config.data.num_channels is {num_channels}"
        )
    images = np.empty((len(files), image_size, image_size, num_channels), np.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            if image.size != (image_size, image_size):
                raise ValueError(
                    f"{path}: image size is {image.size[1]}x{image.size[0]}, but "
                    f"config.data.image_size is {image_size}: set "
                    f"--config.data.image_size={image.size[1]} if all images have that size, "
                    f"or convert the folder with python -m cm_jax.convert_data "
                    f"--image_size={image_size} (images are not resized on loading)"
                )
            images[i] = np.asarray(image.convert(mode)).reshape(images.shape[1:])
    return images, labels


def _load_npz_split(
    folder: str, split: str, image_size: int, num_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the split's shards, checking each one and naming the file at fault.

    Labels (small) are read first to size one output array, then each shard's images are
    copied into it, so peak memory is the dataset plus one shard rather than twice the
    dataset (this matters for ImageNet-64, about 16 GB as uint8).
    """
    files = npz_split_files(folder, split)
    labels = [read_npz_member(path, "labels") for path in files]
    total = sum(np.size(shard_labels) for shard_labels in labels)  # checked per shard below
    images = np.empty((total, image_size, image_size, num_channels), np.uint8)
    start = 0
    for path, shard_labels in zip(files, labels):
        shard_images = read_npz_member(path, "images")
        check_arrays(shard_images, shard_labels, path)
        check_image_shape(shard_images.shape[1:], image_size, num_channels, path)
        images[start : start + len(shard_images)] = shard_images
        start += len(shard_images)
    return images, np.concatenate(labels)


# What np.load raises on a damaged archive: a truncated file has no zip directory
# (BadZipFile); a damaged member fails its CRC (BadZipFile) or inflation (zlib.error), or is
# short (EOFError, ValueError); a file that is no zip archive at all makes numpy fall back to
# unpickling, refused with a ValueError that suggests allow_pickle=True, which must never be
# followed for a file of unknown origin.
_DAMAGED_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def read_npz_member(path: str, key: str) -> np.ndarray:
    """One array from an npz file, with an error naming the file if the key is missing or
    the file is damaged."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise KeyError(key)
            return npz[key]
    except KeyError:
        raise ValueError(
            f"{path}: npz file lacks the array {key!r} (it has {_npz_keys(path)}); "
            "each shard needs 'images' and 'labels'"
        ) from None
    except _DAMAGED_NPZ_ERRORS as error:
        raise ValueError(
            f"{path}: the npz file is damaged (truncated, corrupted, or not an npz archive of "
            f"numeric arrays: {type(error).__name__}); write or download it again"
        ) from None


def _npz_keys(path: str) -> list[str]:
    with np.load(path, allow_pickle=False) as npz:
        return sorted(npz.files)


_TFDS_READ_CHUNK = 10_000


def _load_tfds_split(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a tfds split into numpy, in chunks of `_TFDS_READ_CHUNK` examples.

    Reading in chunks instead of `batch_size=-1` keeps TensorFlow from building one
    tensor of unknown size up front (`batch_size=-1` asks the dataset info for the split
    size; with no such info, as under `tfds.testing.mock_data`, TensorFlow aborts).
    """
    tf, tfds = import_tfds()
    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
    images, labels = [], []
    for chunk in tfds.as_numpy(ds.batch(_TFDS_READ_CHUNK)):
        images.append(chunk["image"])
        labels.append(chunk["label"])
    if not images:
        raise ValueError(f"tfds {name!r} split {split!r} is empty")
    return np.concatenate(images), np.concatenate(labels)


def import_tfds():
    """(tensorflow, tensorflow_datasets), with TensorFlow kept off the accelerators."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "reading a tfds dataset needs tensorflow and tensorflow_datasets, which are not "
            "installed (pip install tensorflow-cpu tensorflow-datasets); or set "
            "config.data.dir to a folder of npz shards, image files or converted data"
        ) from error
    _hide_accelerators_from_tensorflow(tf)
    return tf, tfds


def _hide_accelerators_from_tensorflow(tf) -> None:
    """TensorFlow would otherwise reserve GPU memory that JAX needs; it only decodes here."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialised its devices; nothing to do.
        pass
