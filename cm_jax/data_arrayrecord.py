"""A split converted to ArrayRecord shards, read by random access instead of into memory.

`python -m cm_jax.convert_data` writes the shards and `{split}.metadata.json`;
`data.load_split` comes here when `config.data.dir` holds them. The dataset keeps only the
shard indices in memory (a few bytes per example), so ImageNet-64 (15.7 GB as uint8) or LSUN
bedroom at 256² (596 GB) cost each process what its batches cost, and each process reads and
decodes only the rows it feeds (`input_pipeline.host_batch` asks for those rows alone).

The module reads top to bottom:

1. The record layout (`encode_record` / `decode_record_into`), shared with the converter.
2. `open_split`: the metadata and the shards checked against the config and each other;
   every problem (missing, truncated or unreadable shards, a metadata file that disagrees
   with the config or with the shards) is one error naming the file, raised before training.
3. `ArrayRecordDataset`: `gather(indices)` reads the records through grain's
   `ArrayRecordDataSource` (one thread-safe reader per shard, opened on first use) and
   decodes them in a pool of `config.data.num_workers` threads. PNG decoding and the reads
   release the GIL, so the threads decode in parallel.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import struct

import grain
import numpy as np
from array_record.python import array_record_module
from PIL import Image

from cm_jax import data

# ----------------------------------------------------------------------------------------
# The record layout
# ----------------------------------------------------------------------------------------

FORMAT = "cm_jax.arrayrecord.v1"
RECORD_LAYOUT = (
    "int32 little-endian label, then the image: a PNG file (encoding 'png') or the uint8 "
    "pixels in H, W, C order (encoding 'raw')"
)
ENCODINGS = ("png", "raw")
_LABEL = struct.Struct("<i")

# Default of config.data.num_workers: decode threads per process. One thread decodes a few
# thousand 64² PNGs or about 400 256² PNGs a second (benchmarks/data_throughput.py), against
# the ~1-3k images/s per host that the ImageNet-64 and LSUN-256 recipes consume.
DEFAULT_NUM_WORKERS = 4


def encode_record(image: np.ndarray, label: int, encoding: str) -> bytes:
    """One record: the label, then the image (uint8 [H, W, C]) as PNG or raw pixels."""
    if encoding == "png":
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
        payload = buffer.getvalue()
    elif encoding == "raw":
        payload = np.ascontiguousarray(image, np.uint8).tobytes()
    else:
        raise ValueError(f"unknown encoding {encoding!r}; use one of {ENCODINGS}")
    return _LABEL.pack(int(label)) + payload


def decode_record_into(record: bytes, encoding: str, out: np.ndarray) -> int:
    """Decode `record` into `out` (uint8 [H, W, C], the shape the metadata gives) and return
    its label. A record whose image has another shape raises ValueError."""
    (label,) = _LABEL.unpack_from(record)
    payload = memoryview(record)[_LABEL.size :]
    if encoding == "png":
        with Image.open(io.BytesIO(payload), formats=["PNG"]) as image:
            pixels = np.asarray(image)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # grayscale
    else:
        pixels = np.frombuffer(payload, np.uint8)
        if pixels.size != out.size:
            raise ValueError(f"raw image of {pixels.size} bytes, expected {out.size}")
        pixels = pixels.reshape(out.shape)
    if pixels.shape != out.shape:
        raise ValueError(f"image of shape {pixels.shape}, expected {out.shape}")
    out[...] = pixels
    return label


# ----------------------------------------------------------------------------------------
# Opening a converted split
# ----------------------------------------------------------------------------------------


def open_split(data_config, num_classes: int | None = None) -> ArrayRecordDataset:
    """The converted split `data_config.split` in `data_config.dir`, checked against the
    config (`num_classes`: `config.model.num_classes`, see `data.check_num_classes`)."""
    folder, split = data_config.dir, data_config.split
    metadata_path = data.arrayrecord_metadata_path(folder, split)
    metadata = read_metadata(metadata_path)
    data.check_image_shape(
        tuple(metadata["image_shape"]),
        int(data_config.image_size),
        int(data_config.num_channels),
        metadata_path,
    )
    data.check_num_classes(int(metadata["num_classes"]), num_classes, metadata_path)
    shards = [os.path.join(folder, shard["file"]) for shard in metadata["shards"]]
    num_workers = int(getattr(data_config, "num_workers", DEFAULT_NUM_WORKERS))
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        list(pool.map(_check_shard, shards, metadata["shards"]))
        if getattr(data_config, "verify_checksums", False):
            list(pool.map(_check_checksum, shards, metadata["shards"]))
    counts = [int(shard["num_records"]) for shard in metadata["shards"]]
    if not sum(counts):
        raise ValueError(f"{metadata_path}: the converted split holds no examples")
    if sum(counts) != metadata["num_examples"]:
        raise ValueError(
            f"{metadata_path}: says num_examples is {metadata['num_examples']}, but its shards "
            f"hold {sum(counts)} records; the metadata is damaged: convert the data again"
        )
    return ArrayRecordDataset(
        shards=shards,
        shard_sizes=counts,
        image_shape=tuple(metadata["image_shape"]),
        encoding=metadata["encoding"],
        num_classes=int(metadata["num_classes"]),
        class_names=metadata.get("class_names"),
        num_workers=num_workers,
    )


_REQUIRED_KEYS = ("format", "num_examples", "image_shape", "num_classes", "encoding", "shards")


def read_metadata(path: str) -> dict:
    """The metadata of a converted split, with one error naming the file if it is missing,
    unreadable or incomplete."""
    folder, name = os.path.split(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing, but {folder!r} holds ArrayRecord shards for split "
            f"{name.split('.')[0]!r}: the conversion is unfinished; run python -m "
            "cm_jax.convert_data again with the same arguments to finish it"
        )
    try:
        with open(path, encoding="utf-8") as file:
            metadata = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: the metadata file is damaged ({error}); convert the data again"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not {FORMAT} metadata; convert the data with python -m cm_jax.convert_data"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"{path}: the metadata lacks {missing}; convert the data again")
    shard_keys = {"file", "num_records", "bytes", "sha256"}
    if not all(isinstance(s, dict) and shard_keys <= s.keys() for s in metadata["shards"]):
        raise ValueError(f"{path}: every shard entry needs {sorted(shard_keys)}; convert again")
    if metadata["encoding"] not in ENCODINGS or len(metadata["image_shape"]) != 3:
        raise ValueError(
            f"{path}: unknown encoding {metadata['encoding']!r} or image shape "
            f"{metadata['image_shape']}; convert the data again"
        )
    return metadata


def _check_shard(path: str, entry: dict) -> None:
    """Raise one error naming `path` unless it exists, has the size the metadata recorded,
    opens as ArrayRecord and holds the recorded number of records. Reads the shard's footer
    only; corruption inside is caught by ArrayRecord's per-chunk hashes when a record is read
    (`ArrayRecordDataset.gather` names the shard), or up front with
    `config.data.verify_checksums`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: shard listed in the metadata is missing; run python -m "
            "cm_jax.convert_data again with the same arguments to rewrite it"
        )
    size = os.path.getsize(path)
    if size != entry["bytes"]:
        raise ValueError(
            f"{path}: shard is {size} bytes, but the metadata recorded {entry['bytes']}: it is "
            "truncated or was modified; run python -m cm_jax.convert_data again with the same "
            "arguments to rewrite it"
        )
    count = count_records(path)
    if count != entry["num_records"]:
        raise ValueError(
            f"{path}: shard holds {count} records, but the metadata says "
            f"{entry['num_records']}; convert the data again"
        )


def count_records(path: str) -> int:
    """The number of records in an ArrayRecord file, or one error naming it if the file
    cannot be opened as one (truncated, or not ArrayRecord)."""
    reader = array_record_module.ArrayRecordReader(path)
    opened = reader.ok()
    count = reader.num_records() if opened else 0
    try:
        reader.close()
    except RuntimeError:  # a reader that failed to open raises its error again on closing
        opened = False
    if not opened:
        raise ValueError(
            f"{path}: damaged ArrayRecord shard (truncated, or not an ArrayRecord file); "
            "run python -m cm_jax.convert_data again with the same arguments to rewrite it"
        )
    return count


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _check_checksum(path: str, entry: dict) -> None:
    if file_sha256(path) != entry["sha256"]:
        raise ValueError(
            f"{path}: shard's sha256 differs from the metadata's: it is corrupted; run "
            "python -m cm_jax.convert_data again with the same arguments to rewrite it"
        )


# ----------------------------------------------------------------------------------------
# The streamed dataset
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ShardInstruction:
    """A whole shard as grain's `ArrayRecordDataSource` takes it (array_record's
    `FileInstruction` protocol): giving the counts here saves opening every shard again."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class ArrayRecordDataset:
    """Examples of a converted split, read on demand: `num_examples`, `image_shape`,
    `num_classes`, `class_names` and `gather(indices)` as `data.Dataset` asks, and
    `images[...]` / `labels[...]` views (slices or index arrays, read on indexing) for code
    written against `data.ImageDataset`, such as the `--mode=stats` evaluator."""

    def __init__(
        self,
        shards: list[str],
        shard_sizes: list[int],
        image_shape: tuple[int, int, int],
        encoding: str,
        num_classes: int,
        class_names: list[str] | None,
        num_workers: int = DEFAULT_NUM_WORKERS,
    ):
        kept = [(path, size) for path, size in zip(shards, shard_sizes) if size]
        self._shards = [path for path, _ in kept]
        self._ends = np.cumsum([size for _, size in kept]).tolist()
        self._source = grain.sources.ArrayRecordDataSource(
            [_ShardInstruction(path, 0, size, size) for path, size in kept]
        )
        self._image_shape = tuple(int(n) for n in image_shape)
        self._encoding = encoding
        self.num_classes = num_classes
        self.class_names = class_names
        self._num_workers = max(1, int(num_workers))
        self._pool = None

    @property
    def num_examples(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    @property
    def images(self) -> _RowView:
        return _RowView(self, 0)

    @property
    def labels(self) -> _RowView:
        return _RowView(self, 1)

    def gather(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, H, W, C], labels int32 [n]) of examples `indices`, read and
        decoded by `num_workers` threads, each taking a contiguous block of the rows."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(f"indices outside [0, {self.num_examples})")
        images = np.empty((len(indices),) + self._image_shape, np.uint8)
        labels = np.empty(len(indices), np.int32)
        blocks = np.array_split(
            np.arange(len(indices)), max(1, min(self._num_workers, len(indices)))
        )
        read = lambda rows: self._read_rows(indices, rows, images, labels)
        if len(blocks) <= 1:
            list(map(read, blocks))
        else:
            list(self._thread_pool().map(read, blocks))
        return images, labels

    def _read_rows(self, indices, rows, images, labels) -> None:
        for row in rows:
            index = int(indices[row])
            try:
                labels[row] = decode_record_into(self._source[index], self._encoding, images[row])
            except (RuntimeError, ValueError, OSError, struct.error) as error:
                raise ValueError(self._damaged(index, error)) from error

    def _damaged(self, index: int, error: Exception) -> str:
        shard = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[shard - 1] if shard else 0)
        return (
            f"{self._shards[shard]}: record {position} is damaged ({error}); run python -m "
            "cm_jax.convert_data again with the same arguments to verify and rewrite the shard"
        )

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._num_workers, thread_name_prefix="ArrayRecordDataset"
            )
        return self._pool

    def close(self) -> None:
        """Stop the decode threads and close the shards; a later `gather` reopens them."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._source.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@dataclasses.dataclass(frozen=True)
class _RowView:
    """`dataset.images[key]` / `dataset.labels[key]` of an `ArrayRecordDataset`: reads the
    rows `key` selects (an int, a slice or an index array) when indexed."""

    dataset: ArrayRecordDataset
    field: int  # 0: images, 1: labels

    def __len__(self) -> int:
        return self.dataset.num_examples

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.dataset.gather(np.arange(*key.indices(len(self))))[self.field]
        if np.ndim(key) == 0:
            index = int(key) + (len(self) if int(key) < 0 else 0)
            return self.dataset.gather([index])[self.field][0]
        return self.dataset.gather(key)[self.field]
