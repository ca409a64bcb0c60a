"""Tests for cm_jax.data: loading and validation of npz, image-folder, tfds and ArrayRecord
splits (the order and the iterator are tests/test_input_pipeline.py)."""

import hashlib
import itertools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cm_jax import data, input_pipeline


def make_data_config(**overrides):
    """A `config.data`: an ml_collections ConfigDict, or a plain namespace where the GPU
    machine's image lacks ml_collections (load_split only reads attributes)."""
    fields = dict(
        dataset="cifar10",
        dir="",
        split="train",
        image_size=8,
        num_channels=3,
        random_flip=True,
        seed=0,
        tfds_data_dir="",
        prefetch=2,
    )
    fields.update(overrides)
    try:
        import ml_collections
    except ImportError:
        return types.SimpleNamespace(**fields)
    return ml_collections.ConfigDict(fields)


def random_arrays(n, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    return images, labels


def write_shard(path, **arrays):
    np.savez(path, **arrays)


@pytest.fixture
def shard_dir(tmp_path):
    """Two train shards (written out of name order) plus a single-file test split."""
    images, labels = random_arrays(30)
    write_shard(tmp_path / "train-00001-of-00002.npz", images=images[20:], labels=labels[20:])
    write_shard(tmp_path / "train-00000-of-00002.npz", images=images[:20], labels=labels[:20])
    test_images, test_labels = random_arrays(7, seed=1)
    write_shard(tmp_path / "test.npz", images=test_images, labels=test_labels)
    write_shard(tmp_path / "unrelated.npz", images=test_images, labels=test_labels)
    return tmp_path, (images, labels), (test_images, test_labels)


@pytest.fixture(scope="module")
def small_dataset():
    images, labels = random_arrays(40)
    return data.ImageDataset(images=images, labels=labels)


@pytest.fixture(scope="module")
def batch_mesh():
    return Mesh(np.array(jax.devices()), ("data",))


# -- pixel conversion -------------------------------------------------------------------


def test_normalize_and_to_uint8_round_trip_every_level():
    levels = np.arange(256, dtype=np.uint8)
    x = data.normalize(levels)
    assert x.dtype == np.float32
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(data.to_uint8(x), levels)


def test_to_uint8_clips_and_works_under_jit():
    x = np.array([-1.7, -1.0, 0.0, 1.0, 2.5], np.float32)
    np.testing.assert_array_equal(data.to_uint8(x), [0, 0, 128, 255, 255])
    out = jax.jit(lambda v: data.to_uint8(data.normalize(data.to_uint8(v))))(jnp.asarray(x))
    assert out.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(out), [0, 0, 128, 255, 255])


# -- npz loading ------------------------------------------------------------------------


def test_npz_train_split_concatenates_shards_in_name_order(shard_dir):
    folder, (images, labels), _ = shard_dir
    dataset = data.load_split(make_data_config(dir=str(folder)))
    assert dataset.num_examples == 30
    np.testing.assert_array_equal(dataset.images, images)
    np.testing.assert_array_equal(dataset.labels, labels)
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int32
    assert not dataset.images.flags.writeable


def test_npz_test_split_reads_single_file(shard_dir):
    folder, _, (test_images, test_labels) = shard_dir
    dataset = data.load_split(make_data_config(dir=str(folder), split="test"))
    np.testing.assert_array_equal(dataset.images, test_images)
    np.testing.assert_array_equal(dataset.labels, test_labels)


def test_npz_test_split_reads_shards(tmp_path):
    images, labels = random_arrays(9)
    write_shard(tmp_path / "test-00000-of-00002.npz", images=images[:4], labels=labels[:4])
    write_shard(tmp_path / "test-00001-of-00002.npz", images=images[4:], labels=labels[4:])
    dataset = data.load_split(make_data_config(dir=str(tmp_path), split="test"))
    np.testing.assert_array_equal(dataset.images, images)


def test_loading_leaves_files_untouched(shard_dir):
    folder = shard_dir[0]

    def snapshot():
        return {
            name: (
                os.stat(folder / name).st_mtime_ns,
                hashlib.sha256((folder / name).read_bytes()).digest(),
            )
            for name in sorted(os.listdir(folder))
        }

    before = snapshot()
    data.load_split(make_data_config(dir=str(folder)))
    assert snapshot() == before


def _write_bad_split(folder, kind):
    images, labels = random_arrays(5)
    shard = folder / "train-00000-of-00001.npz"
    if kind == "no_images":
        write_shard(shard, labels=labels)
    elif kind == "no_labels":
        write_shard(shard, images=images)
    elif kind == "not_uint8":
        write_shard(shard, images=images.astype(np.float32), labels=labels)
    elif kind == "not_4d":
        write_shard(shard, images=images.reshape(5, 8, 24), labels=labels)
    elif kind == "length_mismatch":
        write_shard(shard, images=images, labels=labels[:4])
    elif kind == "wrong_size":
        write_shard(shard, images=random_arrays(5, size=16)[0], labels=labels)
    elif kind == "wrong_channels":
        write_shard(shard, images=random_arrays(5, channels=1)[0], labels=labels)
    elif kind == "both_layouts":
        write_shard(shard, images=images, labels=labels)
        write_shard(folder / "train.npz", images=images, labels=labels)


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("no_images", ValueError, "lacks the array 'images'"),
        ("no_labels", ValueError, "lacks the array 'labels'"),
        ("not_uint8", ValueError, "images must be uint8"),
        ("not_4d", ValueError, "images must be 4-D"),
        ("length_mismatch", ValueError, "length mismatch: 5 images but 4 labels"),
        ("wrong_size", ValueError, "image size is 16x16, but config.data.image_size is 8"),
        ("wrong_channels", ValueError, "1 channels, but config.data.num_channels is 3"),
        ("both_layouts", ValueError, "holds both train.npz and train-\\*.npz"),
    ],
)
def test_bad_shards_raise_one_clear_error(tmp_path, kind, error, match):
    _write_bad_split(tmp_path, kind)
    with pytest.raises(error, match=match):
        data.load_split(make_data_config(dir=str(tmp_path)))


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_split(make_data_config(dir=str(tmp_path / "nowhere")))


def test_folder_without_matching_shards_raises(shard_dir):
    with pytest.raises(FileNotFoundError, match="no shards for split 'validation'"):
        data.load_split(make_data_config(dir=str(shard_dir[0]), split="validation"))


def _write_pngs(folder, images):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))


def test_image_folder_with_class_subfolders_reads_pixels_and_labels(tmp_path):
    images, _ = random_arrays(5)
    _write_pngs(tmp_path / "train" / "cat", images[:2])  # class 0 (sorted names)
    _write_pngs(tmp_path / "train" / "dog", images[2:])  # class 1
    dataset = data.load_split(make_data_config(dir=str(tmp_path)))
    np.testing.assert_array_equal(dataset.images, images)  # PNG is lossless
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1]


def test_flat_image_folder_is_the_split_itself_with_label_zero(tmp_path):
    images, _ = random_arrays(3)
    _write_pngs(tmp_path, images)
    dataset = data.load_split(make_data_config(dir=str(tmp_path), split="anything"))
    np.testing.assert_array_equal(dataset.images, images)
    assert dataset.labels.tolist() == [0, 0, 0]


def test_bad_image_folders_raise_one_clear_error(tmp_path):
    images, _ = random_arrays(2, size=10)
    _write_pngs(tmp_path / "sized", images)
    with pytest.raises(
        ValueError, match=r"000.png: image size is 10x10, but config.data.image_size is 8"
    ):
        data.load_split(make_data_config(dir=str(tmp_path / "sized")))
    _write_pngs(tmp_path / "mixed", random_arrays(1)[0])
    _write_pngs(tmp_path / "mixed" / "cat", random_arrays(1)[0])
    with pytest.raises(ValueError, match="mixes images at its top"):
        data.load_split(make_data_config(dir=str(tmp_path / "mixed")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="or image files in"):
        data.load_split(make_data_config(dir=str(tmp_path / "empty")))


def test_image_dataset_validates_arrays():
    images, labels = random_arrays(4)
    dataset = data.ImageDataset(images=images, labels=labels)
    assert images.flags.writeable and not dataset.images.flags.writeable
    with pytest.raises(ValueError, match="length mismatch"):
        data.ImageDataset(images=images, labels=labels[:3])
    with pytest.raises(ValueError, match="images must be uint8"):
        data.ImageDataset(images=images.astype(np.int32), labels=labels)


# -- real CIFAR-10 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10_train(cifar10_dir):
    return data.load_split(make_data_config(dir=cifar10_dir, image_size=32))


def test_real_cifar10_train_split(cifar10_train):
    assert cifar10_train.num_examples == 50_000
    assert cifar10_train.images.shape == (50_000, 32, 32, 3)
    assert cifar10_train.images.dtype == np.uint8
    assert cifar10_train.labels.dtype == np.int32
    assert set(np.unique(cifar10_train.labels)) == set(range(10))
    mean = cifar10_train.images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, (125.307, 122.950, 113.865), atol=0.05)


def test_real_cifar10_batch(cifar10_train):
    batch = input_pipeline.host_batch(
        cifar10_train, step=123, global_batch_size=64, seed=0, random_flip=True
    )
    assert batch["image"].shape == (64, 32, 32, 3) and batch["image"].dtype == np.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


# -- tfds -------------------------------------------------------------------------------


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = make_data_config(dataset="cifar10", dir="", image_size=32)
    with tfds.testing.mock_data(num_examples=12):
        dataset = data.load_split(config)
    assert dataset.num_examples == 12
    assert dataset.images.shape == (12, 32, 32, 3) and dataset.images.dtype == np.uint8
    assert dataset.labels.dtype == np.int32
    with tfds.testing.mock_data(num_examples=12):
        with pytest.raises(ValueError, match="config.data.image_size is 64"):
            data.load_split(make_data_config(dataset="cifar10", dir="", image_size=64))


# -- error messages name the flag to set; damaged npz files ------------------------------


def test_shape_errors_name_the_flag_to_set(tmp_path):
    _write_bad_split(tmp_path, "wrong_size")
    with pytest.raises(ValueError, match="set --config.data.image_size=16 \\(or use the match"):
        data.load_split(make_data_config(dir=str(tmp_path)))
    os.remove(tmp_path / "train-00000-of-00001.npz")
    _write_bad_split(tmp_path, "wrong_channels")
    with pytest.raises(ValueError, match="set --config.data.num_channels=1 \\(or use the match"):
        data.load_split(make_data_config(dir=str(tmp_path)))


def _damage_npz(path, kind):
    content = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(content[: len(content) // 2])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(content)))
    elif kind == "corrupted_member":  # np.savez stores members uncompressed: fails the CRC
        middle = slice(len(content) // 2, len(content) // 2 + 64)
        flipped = bytes(b ^ 0xFF for b in content[middle])
        path.write_bytes(content[: middle.start] + flipped + content[middle.stop :])


@pytest.mark.parametrize("kind", ["truncated", "random_bytes", "corrupted_member"])
def test_damaged_npz_is_one_clear_error_without_pickle_advice(tmp_path, kind):
    images, labels = random_arrays(20)
    shard = tmp_path / "train-00000-of-00001.npz"
    write_shard(shard, images=images, labels=labels)
    _damage_npz(shard, kind)
    with pytest.raises(ValueError, match="the npz file is damaged") as error:
        data.load_split(make_data_config(dir=str(tmp_path)))
    assert str(shard) in str(error.value)
    assert "pickle" not in str(error.value)


def test_labels_beyond_the_models_classes_raise(shard_dir):
    config = make_data_config(dir=str(shard_dir[0]))
    assert data.load_split(config, num_classes=10).num_examples == 30
    with pytest.raises(ValueError, match="set --config.model.num_classes=10"):
        data.load_split(config, num_classes=5)


# -- streaming from ArrayRecord shards ------------------------------------------------------


@pytest.fixture(scope="module")
def convert_data():
    pytest.importorskip("grain")
    pytest.importorskip("array_record")
    from cm_jax import convert_data

    return convert_data


def convert_npz(convert_data, npz_folder, out, split="train", **settings):
    settings = convert_data.Settings(split=split, **{"shard_size": 7, **settings})
    source = convert_data.open_source(str(npz_folder), split)
    convert_data.convert(source, str(out), settings, num_workers=2, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def both_kinds(convert_data, tmp_path_factory):
    """The same 40 examples in memory and converted to ArrayRecord (six shards of <= 7)."""
    folder = tmp_path_factory.mktemp("npz")
    images, labels = random_arrays(40, seed=3)
    write_shard(folder / "train.npz", images=images, labels=labels)
    in_memory = data.load_split(make_data_config(dir=str(folder)))
    out = convert_npz(convert_data, folder, tmp_path_factory.mktemp("ar"))
    streamed = data.load_split(make_data_config(dir=out, num_workers=3))
    return in_memory, streamed, out


def test_streamed_split_has_the_same_examples(both_kinds):
    in_memory, streamed, _ = both_kinds
    assert type(streamed).__name__ == "ArrayRecordDataset"
    assert streamed.num_examples == in_memory.num_examples == 40
    assert streamed.image_shape == in_memory.image_shape == (8, 8, 3)
    order = np.random.default_rng(0).permutation(40)
    for dataset in (in_memory, streamed):
        images, labels = dataset.gather(order)
        assert images.dtype == np.uint8 and labels.dtype == np.int32 and images.flags.writeable
    np.testing.assert_array_equal(streamed.gather(order)[0], in_memory.images[order])
    np.testing.assert_array_equal(streamed.gather(order)[1], in_memory.labels[order])
    # The ImageDataset-style views, as the --mode=stats evaluator reads them.
    np.testing.assert_array_equal(streamed.images[5:17], in_memory.images[5:17])
    np.testing.assert_array_equal(streamed.images[-1], in_memory.images[-1])
    np.testing.assert_array_equal(streamed.labels[[3, 1, 3]], in_memory.labels[[3, 1, 3]])
    assert len(streamed.images) == 40


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("random_flip", [True, False])
def test_streamed_batches_equal_in_memory_batches(both_kinds, process_count, random_flip):
    in_memory, streamed, _ = both_kinds
    for step in range(7):  # 7 * 16 > 40: crosses epoch boundaries
        for process_index in range(process_count):
            args = (step, 16, 5, random_flip, process_index, process_count)
            expected = input_pipeline.host_batch(in_memory, *args)
            got = input_pipeline.host_batch(streamed, *args)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_streamed_iterator_equals_in_memory_iterator(both_kinds, batch_mesh, steps_per_call):
    in_memory, streamed, _ = both_kinds
    spec = P(None, "data") if steps_per_call > 1 else P("data")
    args = dict(
        global_batch_size=16,
        sharding=NamedSharding(batch_mesh, spec),
        start_step=2,
        seed=1,
        random_flip=True,
        steps_per_call=steps_per_call,
    )
    with (
        input_pipeline.TrainIterator(in_memory, **args) as a,
        input_pipeline.TrainIterator(streamed, **args) as b,
    ):
        for (step_a, batch_a), (step_b, batch_b) in zip(
            itertools.islice(a, 3), itertools.islice(b, 3)
        ):
            assert step_a == step_b
            assert batch_b["image"].sharding == args["sharding"]
            for key in batch_a:
                np.testing.assert_array_equal(np.asarray(batch_b[key]), np.asarray(batch_a[key]))


def test_worker_count_does_not_change_the_data(both_kinds):
    _, streamed, out = both_kinds
    one = data.load_split(make_data_config(dir=out, num_workers=1))
    order = np.arange(40)[::-1]
    for got, expected in zip(one.gather(order), streamed.gather(order)):
        np.testing.assert_array_equal(got, expected)


# -- damaged or mismatched ArrayRecord data -------------------------------------------------


@pytest.fixture
def converted(convert_data, tmp_path):
    """A fresh converted copy of 20 examples in three shards (7, 7, 6)."""
    images, labels = random_arrays(20, seed=4)
    write_shard(tmp_path / "train.npz", images=images, labels=labels)
    return convert_npz(convert_data, tmp_path, tmp_path / "ar")


def _shard(folder, k=1):
    return os.path.join(folder, f"train-{k:05d}-of-00003.array_record")


def _edit_metadata(folder, edit):
    path = os.path.join(folder, "train.metadata.json")
    with open(path) as file:
        metadata = json.load(file)
    edit(metadata)
    with open(path, "w") as file:
        json.dump(metadata, file)


def _damage(folder, kind):
    shard = _shard(folder)
    content = open(shard, "rb").read()
    if kind == "missing_shard":
        os.remove(shard)
    elif kind == "truncated_shard":
        open(shard, "wb").write(content[: len(content) // 2])
    elif kind == "random_shard":
        open(shard, "wb").write(np.random.default_rng(0).bytes(len(content)))
    elif kind == "no_metadata":
        os.remove(os.path.join(folder, "train.metadata.json"))
    elif kind == "damaged_metadata":
        open(os.path.join(folder, "train.metadata.json"), "w").write('{"format": ')
    elif kind == "foreign_metadata":
        open(os.path.join(folder, "train.metadata.json"), "w").write("[1, 2]")
    elif kind == "count_in_metadata":
        _edit_metadata(folder, lambda m: m.update(num_examples=21))
    elif kind == "shard_count_in_metadata":
        _edit_metadata(folder, lambda m: m["shards"][1].update(num_records=8))


@pytest.mark.parametrize(
    "kind, error, match",
    [
        ("missing_shard", FileNotFoundError, "train-00001-of-00003.array_record: shard listed"),
        ("truncated_shard", ValueError, "00001-of-00003.array_record: shard is .* truncated"),
        ("random_shard", ValueError, "00001-of-00003.array_record: damaged ArrayRecord shard"),
        ("no_metadata", FileNotFoundError, "train.metadata.json is missing.* unfinished"),
        ("damaged_metadata", ValueError, "train.metadata.json: the metadata file is damaged"),
        ("foreign_metadata", ValueError, "train.metadata.json: not cm_jax.arrayrecord.v1"),
        ("count_in_metadata", ValueError, "num_examples is 21, but its shards hold 20"),
        ("shard_count_in_metadata", ValueError, "00001-of-00003.array_record: shard holds 7"),
    ],
)
def test_bad_arrayrecord_data_raises_one_clear_error(converted, kind, error, match):
    _damage(converted, kind)
    with pytest.raises(error, match=match):
        data.load_split(make_data_config(dir=converted))


def test_corrupted_records_are_named_on_load_with_checksums_or_on_read(converted):
    shard = _shard(converted)
    content = bytearray(open(shard, "rb").read())
    content[100:200] = bytes(b ^ 0xFF for b in content[100:200])  # inside the first record
    open(shard, "wb").write(bytes(content))
    with pytest.raises(ValueError, match="00001-of-00003.array_record: shard's sha256 differs"):
        data.load_split(make_data_config(dir=converted, verify_checksums=True))
    dataset = data.load_split(make_data_config(dir=converted))  # size and count still agree
    dataset.gather([0, 6, 13])  # the other shards read fine
    with pytest.raises(ValueError, match="00001-of-00003.array_record: record 0 is damaged"):
        dataset.gather([7])


def test_metadata_that_disagrees_with_the_config_names_the_flag(converted):
    with pytest.raises(ValueError, match="set --config.data.image_size=8 \\(or use the match"):
        data.load_split(make_data_config(dir=converted, image_size=16))
    with pytest.raises(ValueError, match="set --config.data.num_channels=3 \\(or use the match"):
        data.load_split(make_data_config(dir=converted, num_channels=1))
    assert data.load_split(make_data_config(dir=converted), num_classes=10).num_examples == 20
    assert data.load_split(make_data_config(dir=converted), num_classes=1000).num_examples == 20
    with pytest.raises(ValueError, match="has 10 classes.*set --config.model.num_classes=10"):
        data.load_split(make_data_config(dir=converted), num_classes=5)
    _edit_metadata(converted, lambda m: m.update(num_classes=0))
    with pytest.raises(ValueError, match="has no class labels.*--config.model.num_classes=0"):
        data.load_split(make_data_config(dir=converted), num_classes=10)
