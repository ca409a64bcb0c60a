"""Convert an image dataset into ArrayRecord shards, which training streams instead of loading.

    python -m cm_jax.convert_data --src=/data/imagenet/train --out=/data/imagenet64 \\
        --image_size=64                      # image files; class subfolders give the labels
    python -m cm_jax.convert_data --src=/work/shared/data/cifar10 --out=/data/cifar10_ar \\
        --split=test                         # the project's npz shards
    python -m cm_jax.convert_data --src=tfds:lsun/bedroom --out=/data/lsun_bedroom \\
        --image_size=256 --crop=lsun_bedroom  # a tfds dataset

Then train with `--config.data.dir=OUT` (and `--config.data.split=SPLIT`); `data.load_split`
finds the converted split and streams it (`cm_jax/data_arrayrecord.py`).

What `--out` receives: shards `{split}-00000-of-00128.array_record` (group size 1, for random
access; one record per image, `data_arrayrecord.RECORD_LAYOUT`), beside each finished shard a
done-marker `….array_record.done.json` (record count, size, sha256, skipped files, a digest of
the settings), and last `{split}.metadata.json` (count, image shape, classes and their
names, source, settings, shards, skipped files), whose presence marks a finished conversion.

Images are stored as PNG by default: lossless, so training sees exactly the pixels this
conversion produced, and compact where it matters (LSUN bedroom at 256² is 596 GB as raw
pixels; PNG takes 2/3 to 3/4 of the raw size: CIFAR-10 75 %, the benchmark's images 66 %).
Decoding costs the reader about 0.2 ms per 64² image and 2 ms per 256² image on one core;
Pillow releases the GIL while inflating, so the reader's decode threads
(`config.data.num_workers`) share that work. `--encoding=raw` stores the uint8 pixels
instead: nothing to decode (about 4x the images/s of PNG at 64² in
`benchmarks/data_throughput.py`), at the full raw size, which suits ImageNet-64 (15.7 GB)
where the disk allows.

The module reads top to bottom:

1. Image preparation: `to_pixels` (any mode -> RGB or L) and the two crops of the official
   code, `center_crop_arr` and `lsun_bedroom_crop`.
2. Sources (`open_source`): an image folder, npz shards or a tfds dataset, each a list of
   lazily read items in a fixed order (sorted paths, shard order, tfds order), so the same
   source always gives the same shards.
3. `convert`: shard k holds source items [k * shard_size, (k + 1) * shard_size). Each shard
   is written under a temporary name and renamed when complete; a re-run skips the shards
   whose done-marker, size, sha256 and record count check out and rewrites the rest.
4. The command line (`main`).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
from absl import logging
from array_record.python import array_record_module
from PIL import Image

from cm_jax import data, data_arrayrecord
from cm_jax import progress as progress_lib

# ----------------------------------------------------------------------------------------
# Image preparation
# ----------------------------------------------------------------------------------------


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """openai/guided-diffusion `guided_diffusion/image_datasets.py` `center_crop_arr`, which
    openai/consistency_models' `cm/image_datasets.py` applies to every training image (its
    `random_crop` is off): halve with BOX filtering while the short side is at least twice
    `image_size`, resize with BICUBIC so the short side is `image_size`, and cut out the
    centre square (an odd leftover row or column goes to the bottom or right)."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(
        tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC
    )
    return _centre_square(np.array(image), image_size)


def lsun_bedroom_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """openai/guided-diffusion `datasets/lsun_bedroom.py` `read_images`, which made the LSUN
    images of the official runs: one BOX resize so the short side is `image_size`, then the
    centre square. (`center_crop_arr` then leaves such images unchanged in training.)"""
    width, height = image.size
    scale = image_size / min(width, height)
    image = image.resize(
        (int(round(scale * width)), int(round(scale * height))), resample=Image.Resampling.BOX
    )
    return _centre_square(np.array(image), image_size)


def _centre_square(pixels: np.ndarray, image_size: int) -> np.ndarray:
    top, left = (pixels.shape[0] - image_size) // 2, (pixels.shape[1] - image_size) // 2
    return pixels[top : top + image_size, left : left + image_size]


CROPS = {"center_crop_arr": center_crop_arr, "lsun_bedroom": lsun_bedroom_crop}
_MODES = {1: "L", 3: "RGB"}


def to_pixels(raw, image_size: int, crop: str, num_channels: int) -> np.ndarray:
    """uint8 [H, W, num_channels] of an encoded image file (bytes) or a pixel array: converted
    to RGB (or L; grayscale, palette and RGBA images alike, as the official loader's
    `convert("RGB")`) and, when `image_size` > 0, resized and cropped by `CROPS[crop]`."""
    if isinstance(raw, np.ndarray) and _fits(raw, image_size, num_channels):
        return raw  # what conversion and cropping would return unchanged
    if isinstance(raw, np.ndarray):
        image = Image.fromarray(raw[..., 0] if raw.ndim == 3 and raw.shape[-1] == 1 else raw)
    else:
        image = Image.open(io.BytesIO(raw))
        image.load()
    image = image.convert(_MODES[num_channels])
    pixels = CROPS[crop](image, image_size) if image_size else np.asarray(image)
    return pixels.reshape(pixels.shape[:2] + (num_channels,))


def _fits(pixels: np.ndarray, image_size: int, num_channels: int) -> bool:
    size_fits = not image_size or pixels.shape[:2] == (image_size, image_size)
    return (
        pixels.dtype == np.uint8
        and pixels.ndim == 3
        and pixels.shape[2] == num_channels
        and (size_fits)
    )


# ----------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceItem:
    """One example of a source: `read()` returns its encoded image file (bytes) or its pixels
    and may raise for a damaged file; `name` identifies it in errors and in the metadata."""

    name: str
    label: int
    read: Callable[[], bytes | np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset to convert: `items()` yields its `num_examples` items, always in one order.
    `unreadable` lists files left out while listing (npz shards under --skip_bad)."""

    description: str
    num_examples: int
    num_classes: int  # 0: unlabelled, every label 0
    class_names: list[str] | None
    items: Callable[[], Iterator[SourceItem]]
    unreadable: tuple = ()


def open_source(src: str, split: str, tfds_data_dir: str = "", skip_bad: bool = False):
    """The `Source` that `--src` names: `tfds:NAME`, or a folder of npz shards
    (`{split}-*.npz` or `{split}.npz`) or of image files (`src/split` if it has images,
    else `src`), told apart as `data.load_split` tells them apart."""
    if src.startswith("tfds:"):
        return tfds_source(src[len("tfds:") :], split, tfds_data_dir)
    if not os.path.isdir(src):
        raise FileNotFoundError(
            f"--src {src!r} is not a folder; for a tfds dataset write --src=tfds:NAME"
        )
    folder = data.image_folder(src, split)
    return image_folder_source(folder) if folder else npz_source(src, split, skip_bad)


def image_folder_source(folder: str) -> Source:
    """Image files under `folder` in sorted path order; class subfolders give the labels
    (their sorted names are the class names), images directly in `folder` are unlabelled."""
    files = data.image_files(folder)
    labels, classes = data.image_folder_labels(folder, files)
    items = lambda: (
        SourceItem(path, int(label), functools.partial(_read_file, path))
        for path, label in zip(files, labels)
    )
    description = f"image folder {os.path.abspath(folder)}"
    return Source(description, len(files), len(classes), classes or None, items)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def npz_source(folder: str, split: str, skip_bad: bool = False) -> Source:
    """The npz shards of `split` in `folder` (as `data.npz_split_files` orders them). Their
    labels are read now, to count the examples; a shard whose labels cannot be read is an
    error, or with `skip_bad` left out and listed. npz files hold no class names."""
    shards, unreadable = [], []
    for path in data.npz_split_files(folder, split):
        try:
            labels = data.read_npz_member(path, "labels")
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{path}: labels must be a 1-D integer array")
        except ValueError as error:
            if not skip_bad:
                raise
            unreadable.append({"name": path, "error": str(error)})
            continue
        shards.append((path, labels))
    cache = _NpzImages()
    items = lambda: (
        SourceItem(f"{path}[{row}]", int(label), functools.partial(cache.row, path, row))
        for path, labels in shards
        for row, label in enumerate(labels)
    )
    num_classes = max((int(labels.max()) + 1 for _, labels in shards if len(labels)), default=0)
    description = f"npz shards of split {split!r} in {os.path.abspath(folder)}"
    total = sum(len(labels) for _, labels in shards)
    return Source(description, total, num_classes, None, items, tuple(unreadable))


class _NpzImages:
    """The `images` of the npz shard being converted, loaded on first use, one shard at a
    time (shared by the worker threads; a shard that fails to load fails every row)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._path, self._images = None, None

    def row(self, path: str, row: int) -> np.ndarray:
        with self._lock:
            if self._path != path:
                self._path, self._images = path, None  # free the last shard first
                try:
                    self._images = data.read_npz_member(path, "images")
                except ValueError as error:
                    self._images = error
            images = self._images
        if isinstance(images, Exception):
            raise images
        return images[row]


def tfds_source(name: str, split: str, data_dir: str = "") -> Source:
    """A tfds dataset's split in tfds order (`shuffle_files=False`), its images taken as the
    stored PNG/JPEG bytes (`SkipDecoding`), which Pillow decodes as for image files; labels
    from a `ClassLabel` feature named 'label', if any. (JPEG decoders may differ by a level
    here and there from TensorFlow's.)"""
    _, tfds = data.import_tfds()
    builder = tfds.builder(name, data_dir=data_dir or None)
    features = builder.info.features
    if "image" not in features:
        raise ValueError(f"tfds {name!r} has no 'image' feature (it has {sorted(features)})")
    label = features["label"] if "label" in features else None
    names = list(label.names) if isinstance(label, tfds.features.ClassLabel) else None
    load = lambda: tfds.as_numpy(
        tfds.load(
            name,
            split=split,
            data_dir=data_dir or None,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
        )
    )
    try:
        count = builder.info.splits[split].num_examples
    except KeyError:  # no split info (tfds.testing.mock_data): count in one pass
        count = sum(1 for _ in load())
    items = lambda: (
        SourceItem(
            f"tfds {name} {split} example {i}",
            int(example["label"]) if names else 0,
            functools.partial(_identity, example["image"]),
        )
        for i, example in enumerate(load())
    )
    return Source(f"tfds {name} split {split!r}", count, len(names or ()), names, items)


def _identity(value):
    return value


# ----------------------------------------------------------------------------------------
# Writing shards, and resuming
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the shards' contents (recorded in the metadata)."""

    split: str = "train"
    image_size: int = 0  # 0: keep the source's size (all images must share it)
    crop: str = "center_crop_arr"
    num_channels: int = 3
    encoding: str = "png"
    shard_size: int = 10_000


# Group size 1 makes every record its own chunk, which grain needs for fast random access;
# PNG does not compress further and raw pixels are stored raw to be read without decoding.
_WRITER_OPTIONS = "group_size:1,uncompressed"
_CHUNK = 256  # items prepared at a time: bounds memory and keeps the workers busy
_DONE_SUFFIX = ".done.json"


class UnreadableFilesError(ValueError):
    """Source files that cannot be read, named; --skip_bad leaves them out instead."""


def convert(
    source: Source,
    out_dir: str,
    settings: Settings,
    skip_bad: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write `source` as ArrayRecord shards and metadata into `out_dir` (see the module
    docstring), finishing an earlier, interrupted conversion; return the metadata."""
    _check_settings(settings)
    os.makedirs(out_dir, exist_ok=True)
    metadata_path = data.arrayrecord_metadata_path(out_dir, settings.split)
    if os.path.exists(metadata_path):
        os.remove(metadata_path)  # the split counts as unfinished until it is written anew
    num_workers = num_workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        image_shape = _image_shape(source, settings)
        fingerprint = _fingerprint(source, settings, image_shape)
        shards = _shard_paths(out_dir, settings, source.num_examples)
        markers = dict(zip(shards, pool.map(functools.partial(_verified, fingerprint), shards)))
        todo = sum(
            _shard_length(k, settings, source) for k, s in enumerate(shards) if not markers[s]
        )
        if progress:
            verified = sum(map(bool, markers.values()))
            print(
                f"{out_dir}: {verified} of {len(shards)} shards already written and verified; "
                f"converting {todo} images"
            )
        items = source.items()
        prepare = functools.partial(_prepare_record, settings=settings, image_shape=image_shape)
        with progress_lib.Progress(todo, "img", settings.split, enabled=progress) as bar:
            for k, shard in enumerate(shards):
                shard_items = itertools.islice(items, _shard_length(k, settings, source))
                if markers[shard]:
                    collections.deque(shard_items, maxlen=0)  # consumed, never read
                    continue
                prepared = _prepare_ahead(pool, prepare, shard_items)
                markers[shard] = _write_shard(shard, prepared, fingerprint, skip_bad, bar)
    metadata = _metadata(source, settings, image_shape, markers)
    _write_json_atomically(metadata_path, metadata)
    return metadata


def _check_settings(settings: Settings) -> None:
    if settings.crop not in CROPS:
        raise ValueError(f"unknown crop {settings.crop!r}; use one of {sorted(CROPS)}")
    if settings.num_channels not in _MODES:
        raise ValueError(f"num_channels must be 1 or 3, got {settings.num_channels}")
    if settings.encoding not in data_arrayrecord.ENCODINGS:
        raise ValueError(f"encoding must be one of {data_arrayrecord.ENCODINGS}")
    if settings.shard_size < 1 or settings.image_size < 0:
        raise ValueError("shard_size must be positive and image_size >= 0")


def _image_shape(source: Source, settings: Settings) -> tuple[int, int, int]:
    """(H, W, C) every record will have: the requested size, or that of the first readable
    image when the source's size is kept."""
    if settings.image_size:
        return (settings.image_size, settings.image_size, settings.num_channels)
    for item in source.items():
        try:
            return tuple(to_pixels(item.read(), 0, settings.crop, settings.num_channels).shape)
        except Exception:  # a damaged first file: it is named when its shard is written
            continue
    raise ValueError(f"{source.description}: no readable image")


def _fingerprint(source: Source, settings: Settings, image_shape: tuple) -> str:
    """Digest of everything that decides the shards' contents: a done-marker with another
    digest belongs to another conversion, and its shard is rewritten."""
    facts = {
        "format": data_arrayrecord.FORMAT,
        "source": source.description,
        "num_examples": source.num_examples,
        "class_names": source.class_names,
        "image_shape": list(image_shape),
        **dataclasses.asdict(settings),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _shard_paths(out_dir: str, settings: Settings, num_examples: int) -> list[str]:
    if num_examples == 0:
        raise ValueError("the source holds no examples")
    count = -(-num_examples // settings.shard_size)
    return [
        os.path.join(out_dir, data.arrayrecord_shard_name(settings.split, k, count))
        for k in range(count)
    ]


def _shard_length(k: int, settings: Settings, source: Source) -> int:
    return min(settings.shard_size, source.num_examples - k * settings.shard_size)


def _verified(fingerprint: str, shard: str) -> dict | None:
    """The shard's done-marker if the shard is complete: same settings, and the file's size,
    sha256 and record count are those the marker recorded; else None (to be rewritten)."""
    try:
        with open(shard + _DONE_SUFFIX, encoding="utf-8") as file:
            marker = json.load(file)
        complete = (
            marker["settings_sha256"] == fingerprint
            and os.path.getsize(shard) == marker["bytes"]
            and data_arrayrecord.file_sha256(shard) == marker["sha256"]
            and data_arrayrecord.count_records(shard) == marker["num_records"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if complete else None


def _prepare_ahead(pool, prepare, items):
    """Lists of `prepare(item)` for chunks of `_CHUNK` items, in order, the next chunk
    already submitted to the pool while the caller writes the current one."""
    pending = collections.deque()
    while chunk := list(itertools.islice(items, _CHUNK)):
        pending.append(pool.map(prepare, chunk))  # submits the whole chunk now
        if len(pending) > 1:
            yield list(pending.popleft())
    while pending:
        yield list(pending.popleft())


def _prepare_record(item: SourceItem, settings: Settings, image_shape: tuple):
    """(item, record bytes or None, error message or None)."""
    try:
        pixels = to_pixels(item.read(), settings.image_size, settings.crop, settings.num_channels)
    except Exception as error:  # Pillow and numpy raise many types for damaged files
        return item, None, f"{type(error).__name__}: {error}"
    if pixels.shape != image_shape:
        got, first = ("x".join(map(str, shape)) for shape in (pixels.shape, image_shape))
        message = f"image is {got}, the first was {first}: pass --image_size to resize and crop"
        return item, None, message
    return item, data_arrayrecord.encode_record(pixels, item.label, settings.encoding), None


def _write_shard(shard: str, chunks: Iterator[list], fingerprint: str, skip_bad: bool, bar) -> dict:
    """Write the prepared records to `shard` (via `shard.tmp`, renamed when complete) and its
    done-marker; return the marker. Unreadable items raise `UnreadableFilesError` naming them
    (all those of the chunk at hand), or with `skip_bad` are left out and listed."""
    temporary = shard + ".tmp"
    writer = array_record_module.ArrayRecordWriter(temporary, _WRITER_OPTIONS)
    count, skipped = 0, []
    try:
        for chunk in chunks:
            bad = [{"name": item.name, "error": error} for item, _, error in chunk if error]
            if bad and not skip_bad:
                raise UnreadableFilesError(_unreadable_message(bad))
            skipped += bad
            for _, record, _ in chunk:
                if record is not None:
                    writer.write(record)
                    count += 1
            bar.update(len(chunk))
        if not writer.ok():
            raise OSError(f"{temporary}: writing the shard failed")
    finally:
        writer.close()
    if data_arrayrecord.count_records(temporary) != count:
        raise OSError(f"{temporary}: the shard holds fewer records than were written")
    marker = {
        "settings_sha256": fingerprint,
        "num_records": count,
        "bytes": os.path.getsize(temporary),
        "sha256": data_arrayrecord.file_sha256(temporary),
        "skipped": skipped,
    }
    os.replace(temporary, shard)
    _write_json_atomically(shard + _DONE_SUFFIX, marker)
    return marker


def _unreadable_message(bad: list[dict]) -> str:
    listed = "; ".join(f"{entry['name']} ({entry['error']})" for entry in bad)
    return (
        f"cannot read {len(bad)} source file(s): {listed}. Fix or remove them, or pass "
        "--skip_bad to leave them out (the metadata then lists them)"
    )


def _metadata(source: Source, settings: Settings, image_shape: tuple, markers: dict) -> dict:
    skipped = list(source.unreadable) + [s for m in markers.values() for s in m["skipped"]]
    return {
        "format": data_arrayrecord.FORMAT,
        "record_layout": data_arrayrecord.RECORD_LAYOUT,
        "split": settings.split,
        "num_examples": sum(marker["num_records"] for marker in markers.values()),
        "image_shape": list(image_shape),
        "encoding": settings.encoding,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "source": source.description,
        "settings": dataclasses.asdict(settings),
        "shards": [
            {key: marker[key] for key in ("num_records", "bytes", "sha256")}
            | {"file": os.path.basename(shard)}
            for shard, marker in markers.items()
        ],
        "num_skipped": len(skipped),
        "skipped": skipped,
    }


def _write_json_atomically(path: str, value) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m cm_jax.convert_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--src", required=True, help="a folder of images or npz shards, or tfds:NAME"
    )
    parser.add_argument("--out", required=True, help="folder for the shards and metadata")
    parser.add_argument("--split", default="train", help="the split to convert")
    parser.add_argument(
        "--image_size", type=int, default=0, help="resize and crop to this size; 0 keeps it"
    )
    parser.add_argument(
        "--crop",
        default="center_crop_arr",
        choices=sorted(CROPS),
        help="with --image_size: center_crop_arr (openai/consistency_models' training crop) "
        "or lsun_bedroom (guided-diffusion's LSUN preparation)",
    )
    parser.add_argument("--num_channels", type=int, default=3, choices=sorted(_MODES))
    parser.add_argument("--encoding", default="png", choices=data_arrayrecord.ENCODINGS)
    parser.add_argument("--shard_size", type=int, default=10_000, help="examples per shard")
    parser.add_argument(
        "--skip_bad", action="store_true", help="leave out unreadable files (listed)"
    )
    parser.add_argument("--num_workers", type=int, default=0, help="threads; 0: one per CPU")
    parser.add_argument("--tfds_data_dir", default="", help="tfds data_dir for tfds:NAME")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)  # the progress lines of a run whose output is a file
    settings = Settings(
        args.split, args.image_size, args.crop, args.num_channels, args.encoding, args.shard_size
    )
    try:
        source = open_source(args.src, args.split, args.tfds_data_dir, args.skip_bad)
        metadata = convert(source, args.out, settings, args.skip_bad, args.num_workers or None)
    except (OSError, ValueError) as error:
        raise SystemExit(f"convert_data: {error}") from None
    shape = "x".join(map(str, metadata["image_shape"]))
    print(
        f"wrote {metadata['num_examples']} images ({shape}) in {len(metadata['shards'])} "
        f"shards to {args.out}; skipped {metadata['num_skipped']} unreadable file(s); "
        f"metadata: {data.arrayrecord_metadata_path(args.out, args.split)}"
    )
    return metadata


if __name__ == "__main__":
    main()
