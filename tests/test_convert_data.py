"""Tests for cm_jax.convert_data: the official crops, round trips from every source kind,
resuming an interrupted conversion, unreadable files, and real CIFAR-10 converted."""

import json
import os
import types

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("grain")
pytest.importorskip("array_record")

from cm_jax import convert_data, data, input_pipeline  # noqa: E402


def data_config(folder, split="train", image_size=8, num_channels=3):
    """The `config.data` fields `data.load_split` reads."""
    return types.SimpleNamespace(
        dataset="",
        dir=str(folder),
        split=split,
        image_size=image_size,
        num_channels=num_channels,
        tfds_data_dir="",
        num_workers=2,
    )


def random_images(n, height=8, width=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


def write_pngs(folder, images, start=0):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{start + i:03d}.png"))


def run(src, out, *flags):
    return convert_data.main([f"--src={src}", f"--out={out}", "--num_workers=2", *flags])


def read_all(folder, **config):
    dataset = data.load_split(data_config(folder, **config))
    return dataset.gather(np.arange(dataset.num_examples))


def metadata_of(folder, split="train"):
    with open(data.arrayrecord_metadata_path(str(folder), split)) as file:
        return json.load(file)


# -- the crops of the official code -----------------------------------------------------


def coordinate_image(width, height):
    """R = column index, G = row index: a resize followed by a crop keeps each pixel near
    the source coordinates it came from, so the crop's placement can be read off."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def source_coordinate(output_index, source_length, resized_length):
    """The source coordinate of pixel `output_index` of a resize to `resized_length`
    (Pillow samples pixel centres)."""
    return (output_index + 0.5) * source_length / resized_length - 0.5


def test_center_crop_arr_resizes_the_short_side_and_cuts_the_centre():
    pixels = convert_data.center_crop_arr(coordinate_image(100, 60), 32)
    assert pixels.shape == (32, 32, 3)
    # No halving (60 < 64); bicubic to 53x32 (round(100 * 32 / 60) = 53); columns 10..41
    # kept: (53 - 32) // 2 = 10 on the left, 11 on the right.
    first, last = source_coordinate(10, 100, 53), source_coordinate(41, 100, 53)
    np.testing.assert_allclose(pixels[16, [0, -1], 0], [first, last], atol=1.0)
    np.testing.assert_allclose(pixels[[0, -1], 16, 1], [0.44, 58.6], atol=1.0)  # all rows


def test_center_crop_arr_halves_with_box_first():
    image = coordinate_image(300, 200)  # short side 200 >= 2 * 64: halved once to 150x100
    pixels = convert_data.center_crop_arr(image, 64)
    assert pixels.shape == (64, 64, 3)
    halved = image.resize((150, 100), Image.Resampling.BOX)
    resized = np.asarray(halved.resize((96, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(pixels, resized[:, 16:80])  # (96 - 64) // 2 = 16


def test_crops_leave_an_image_of_the_target_size_unchanged():
    pixels = random_images(1, 16, 16)[0]
    for crop in convert_data.CROPS.values():
        np.testing.assert_array_equal(crop(Image.fromarray(pixels), 16), pixels)


def test_lsun_bedroom_crop_is_one_box_resize_then_the_centre():
    image = coordinate_image(60, 100)  # portrait: the crop cuts rows
    pixels = convert_data.lsun_bedroom_crop(image, 32)
    assert pixels.shape == (32, 32, 3)
    resized = np.asarray(image.resize((32, 53), Image.Resampling.BOX))
    np.testing.assert_array_equal(pixels, resized[10:42])


# -- round trips ------------------------------------------------------------------------


def test_image_folder_with_class_subfolders_round_trips(tmp_path):
    images = random_images(5)
    write_pngs(tmp_path / "src" / "train" / "cat", images[:2])
    write_pngs(tmp_path / "src" / "train" / "dog", images[2:])
    write_pngs(tmp_path / "src" / "test" / "cat", images[:1])  # another split: not read
    run(tmp_path / "src", tmp_path / "out")
    got_images, got_labels = read_all(tmp_path / "out")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == [0, 0, 1, 1, 1]
    metadata = metadata_of(tmp_path / "out")
    assert metadata["num_examples"] == 5 and metadata["image_shape"] == [8, 8, 3]
    assert metadata["num_classes"] == 2 and metadata["class_names"] == ["cat", "dog"]
    assert metadata["source"].endswith(os.path.join("src", "train"))
    assert metadata["settings"]["shard_size"] == 10_000 and metadata["num_skipped"] == 0


def test_flat_image_folder_is_unlabelled(tmp_path):
    images = random_images(3)
    write_pngs(tmp_path / "src", images)
    run(tmp_path / "src", tmp_path / "out", "--split=anything", "--encoding=raw")
    got_images, got_labels = read_all(tmp_path / "out", split="anything")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == [0, 0, 0]
    metadata = metadata_of(tmp_path / "out", "anything")
    assert metadata["num_classes"] == 0 and metadata["class_names"] is None
    assert metadata["encoding"] == "raw"


def test_image_folder_is_cropped_and_converted_to_rgb(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "src"
    os.makedirs(folder)
    sources = {
        "a_wide.png": Image.fromarray(random_images(1, 12, 20)[0]),
        "b_gray.png": Image.fromarray(rng.integers(0, 256, (20, 12), dtype=np.uint8)),
        "c_rgba.png": Image.fromarray(rng.integers(0, 256, (9, 9, 4), dtype=np.uint8)),
        "d_photo.jpg": Image.fromarray(random_images(1, 30, 40)[0]),
    }
    for name, image in sources.items():
        image.save(folder / name)
    run(folder, tmp_path / "out", "--image_size=8")
    got_images, _ = read_all(tmp_path / "out")
    assert got_images.shape == (4, 8, 8, 3)
    for got, name in zip(got_images, sorted(sources)):
        with Image.open(folder / name) as image:
            expected = convert_data.center_crop_arr(image.convert("RGB"), 8)
        np.testing.assert_array_equal(got, expected)
    gray = got_images[1]
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # L -> RGB repeats the level


def test_grayscale_output_with_one_channel(tmp_path):
    images = random_images(2)
    write_pngs(tmp_path / "src", images)
    run(tmp_path / "src", tmp_path / "out", "--num_channels=1")
    got_images, _ = read_all(tmp_path / "out", num_channels=1)
    expected = [np.asarray(Image.fromarray(image).convert("L")) for image in images]
    np.testing.assert_array_equal(got_images[..., 0], expected)


@pytest.fixture
def npz_shards(tmp_path):
    """A train split of 23 examples in two npz shards, and its in-memory dataset."""
    images, labels = random_images(23, seed=2), np.arange(23) % 7
    np.savez(tmp_path / "train-00000-of-00002.npz", images=images[:12], labels=labels[:12])
    np.savez(tmp_path / "train-00001-of-00002.npz", images=images[12:], labels=labels[12:])
    return tmp_path, data.load_split(data_config(tmp_path))


def test_npz_shards_round_trip(npz_shards, tmp_path_factory):
    folder, in_memory = npz_shards
    out = tmp_path_factory.mktemp("out")
    run(folder, out, "--shard_size=5")
    got_images, got_labels = read_all(out)
    np.testing.assert_array_equal(got_images, in_memory.images)
    np.testing.assert_array_equal(got_labels, in_memory.labels)
    metadata = metadata_of(out)
    assert [s["num_records"] for s in metadata["shards"]] == [5, 5, 5, 5, 3]
    assert metadata["shards"][0]["file"] == "train-00000-of-00005.array_record"
    assert metadata["num_classes"] == 7 and metadata["class_names"] is None


def test_same_source_gives_the_same_shards(npz_shards, tmp_path_factory):
    folder, _ = npz_shards
    outs = [tmp_path_factory.mktemp("out") for _ in range(2)]
    for out, workers in zip(outs, ("1", "2")):
        convert_data.main(
            [f"--src={folder}", f"--out={out}", "--shard_size=5", f"--num_workers={workers}"]
        )
    assert metadata_of(outs[0])["shards"] == metadata_of(outs[1])["shards"]


def test_tfds_mock_data_round_trips(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds_config = types.SimpleNamespace(
        **{**vars(data_config("", image_size=32)), "dataset": "cifar10"}
    )
    with tfds.testing.mock_data(num_examples=12):
        in_memory = data.load_split(tfds_config)
        source = convert_data.open_source("tfds:cifar10", "train")
        assert source.num_examples == 12 and source.num_classes == 10
        settings = convert_data.Settings(shard_size=5)
        convert_data.convert(source, str(tmp_path), settings, num_workers=2, progress=False)
    got_images, got_labels = read_all(tmp_path, image_size=32)
    np.testing.assert_array_equal(got_images, in_memory.images)
    np.testing.assert_array_equal(got_labels, in_memory.labels)
    metadata = metadata_of(tmp_path)
    assert metadata["source"] == "tfds cifar10 split 'train'"
    assert metadata["class_names"] == [str(k) for k in range(10)]  # the mock's names


# -- resuming -----------------------------------------------------------------------------

WRITE_SHARD = convert_data._write_shard


def spy_on_shard_writes(monkeypatch, interrupt_at=None):
    """The shards (their first 11 characters, "train-0000k") written from now on; writing
    shard `interrupt_at` leaves half a temporary file and stops, as a killed run would."""
    written = []

    def write_shard(shard, *args):
        name = os.path.basename(shard)[:11]
        if name == interrupt_at:
            open(shard + ".tmp", "wb").write(b"half a shard")
            raise KeyboardInterrupt
        written.append(name)
        return WRITE_SHARD(shard, *args)

    monkeypatch.setattr(convert_data, "_write_shard", write_shard)
    return written


def test_resume_skips_verified_shards_and_rewrites_the_rest(npz_shards, tmp_path, monkeypatch):
    folder, in_memory = npz_shards
    out = tmp_path / "out"
    written = spy_on_shard_writes(monkeypatch, interrupt_at="train-00003")
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, "--shard_size=5")
    assert written == ["train-00000", "train-00001", "train-00002"]
    with pytest.raises(FileNotFoundError, match="conversion is unfinished"):
        data.load_split(data_config(out))

    shard = lambda k: out / f"train-{k:05d}-of-00005.array_record"
    content = shard(1).read_bytes()
    shard(1).write_bytes(content[:-5000])  # truncated
    content = shard(2).read_bytes()
    shard(2).write_bytes(content[:100] + bytes(100) + content[200:])  # corrupted, same size
    written = spy_on_shard_writes(monkeypatch)
    run(folder, out, "--shard_size=5")
    assert written == ["train-00001", "train-00002", "train-00003", "train-00004"]
    assert not os.path.exists(f"{shard(3)}.tmp")
    got_images, got_labels = read_all(out)
    np.testing.assert_array_equal(got_images, in_memory.images)
    np.testing.assert_array_equal(got_labels, in_memory.labels)

    written.clear()
    run(folder, out, "--shard_size=5")  # complete: nothing to write
    assert written == []
    os.remove(shard(3))
    run(folder, out, "--shard_size=5")
    assert written == ["train-00003"]
    written.clear()
    run(folder, out, "--shard_size=5", "--encoding=raw")  # other settings: all rewritten
    assert len(written) == 5
    np.testing.assert_array_equal(read_all(out)[0], in_memory.images)


# -- unreadable and unsuitable files ------------------------------------------------------


@pytest.fixture
def folder_with_bad_files(tmp_path):
    """Six images of which two are unreadable: random bytes, and a truncated PNG."""
    images = random_images(4)
    folder = tmp_path / "src"
    write_pngs(folder, images[:2])
    write_pngs(folder, images[2:], start=4)
    (folder / "002.png").write_bytes(np.random.default_rng(0).bytes(300))
    content = (folder / "000.png").read_bytes()
    (folder / "003.png").write_bytes(content[: len(content) // 2])
    return folder, images


def test_unreadable_files_are_named_in_the_error(folder_with_bad_files, tmp_path):
    folder, _ = folder_with_bad_files
    with pytest.raises(SystemExit, match="cannot read 2 source file") as error:
        run(folder, tmp_path / "out")
    assert str(folder / "002.png") in str(error.value)
    assert str(folder / "003.png") in str(error.value)
    assert not os.path.exists(data.arrayrecord_metadata_path(str(tmp_path / "out"), "train"))


def test_skip_bad_leaves_them_out_and_lists_them(folder_with_bad_files, tmp_path, capsys):
    folder, images = folder_with_bad_files
    metadata = run(folder, tmp_path / "out", "--skip_bad")
    assert "skipped 2 unreadable file(s)" in capsys.readouterr().out
    assert metadata == metadata_of(tmp_path / "out")
    assert metadata["num_examples"] == 4 and metadata["num_skipped"] == 2
    skipped = [entry["name"] for entry in metadata["skipped"]]
    assert skipped == [str(folder / "002.png"), str(folder / "003.png")]
    np.testing.assert_array_equal(read_all(tmp_path / "out")[0], images)


def test_skip_bad_leaves_out_a_damaged_npz_shard(npz_shards, tmp_path):
    folder, in_memory = npz_shards
    damaged = folder / "train-00000-of-00002.npz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="train-00000-of-00002.npz: the npz file is damaged"):
        run(folder, tmp_path / "out")
    metadata = run(folder, tmp_path / "out", "--skip_bad")
    assert [entry["name"] for entry in metadata["skipped"]] == [str(damaged)]
    np.testing.assert_array_equal(read_all(tmp_path / "out")[0], in_memory.images[12:])


def test_images_of_other_sizes_need_image_size(tmp_path):
    write_pngs(tmp_path / "src", random_images(2))
    write_pngs(tmp_path / "src", random_images(1, 10, 8), start=2)
    with pytest.raises(SystemExit, match=r"002.png \(image is 10x8x3, the first was 8x8x3: pass"):
        run(tmp_path / "src", tmp_path / "out")
    run(tmp_path / "src", tmp_path / "out", "--image_size=8")
    assert metadata_of(tmp_path / "out")["num_examples"] == 3


def test_missing_source_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder; for a tfds dataset write --src=tfds"):
        run(tmp_path / "nowhere", tmp_path / "out")


# -- real CIFAR-10 ------------------------------------------------------------------------


def test_real_cifar10_converted_gives_the_npz_batches(cifar10_dir, tmp_path):
    run(cifar10_dir, tmp_path, "--split=test", "--shard_size=4000")
    npz = data.load_split(data_config(cifar10_dir, split="test", image_size=32))
    streamed = data.load_split(data_config(tmp_path, split="test", image_size=32))
    assert streamed.num_examples == npz.num_examples == 10_000
    images, labels = streamed.gather(np.arange(10_000))
    np.testing.assert_array_equal(images, npz.images)
    np.testing.assert_array_equal(labels, npz.labels)
    for step in (0, 77, 156):  # 156 crosses into the second epoch at batch 64
        for process_index in range(2):
            args = (step, 64, 0, True, process_index, 2)
            expected = input_pipeline.host_batch(npz, *args)
            got = input_pipeline.host_batch(streamed, *args)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
