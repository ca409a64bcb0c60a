"""metric_logging: grids with borders and captions, the JSONL and TensorBoard writers (read back
with TensorBoard's own event reader), the config as text and hparams, evaluation scalars added
to a finished run, and gs:// paths through etils' mock file system."""

import json
import os

import numpy as np
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing
from PIL import Image

from cm_jax import metric_logging
from configs import cifar10_ict


def tiles(n, h=2, w=3, c=3):
    """n constant tiles, tile k filled with 10·(k+1), except pixel (0, 0) which is 200 + k."""
    images = np.zeros((n, h, w, c), np.uint8)
    for k in range(n):
        images[k] = 10 * (k + 1)
        images[k, 0, 0] = 200 + k
    return images


# -------------------------------------------------------------------------------------- grids
def test_grid_has_a_border_between_and_around_tiles_and_tiles_in_row_major_order():
    images = tiles(5)  # 2 rows × 3 columns, the last cell blank
    grid = metric_logging.image_grid(images, num_columns=3)
    # rows·H + (rows+1)·2, cols·W + (cols+1)·2
    assert grid.shape == (2 * 2 + 3 * 2, 3 * 3 + 4 * 2, 3) and grid.dtype == np.uint8
    covered = np.zeros(grid.shape[:2], bool)
    for k in range(5):
        r, q = divmod(k, 3)
        top, left = 2 + r * (2 + 2), 2 + q * (3 + 2)
        np.testing.assert_array_equal(grid[top : top + 2, left : left + 3], images[k])
        covered[top : top + 2, left : left + 3] = True
    assert (grid[~covered] == 128).all()  # borders and the blank cell: mid grey
    # Row 0, 1, 4, 5, 8, 9 and column 0, 1, 5, 6, 10, 11, 15, 16 are border.
    assert (grid[[0, 1, 4, 5, 8, 9]] == 128).all()
    assert (grid[:, [0, 1, 5, 6, 10, 11, 15, 16]] == 128).all()
    assert grid[2, 2, 0] == 200 and grid[6, 7, 0] == 204  # tile 0 and tile 4 top-left pixels


def test_grid_padding_zero_is_the_plain_tiling_and_alpha_stays_opaque():
    images = tiles(4)
    grid = metric_logging.image_grid(images, padding=0)  # 2×2
    assert grid.shape == (4, 6, 3)
    np.testing.assert_array_equal(grid[2:, :3], images[2])
    rgba = metric_logging.image_grid(np.full((3, 2, 2, 4), 7, np.uint8))  # 2×2, one blank cell
    assert rgba.shape == (2 * 2 + 3 * 2, 2 * 2 + 3 * 2, 4)
    assert (rgba[..., 3][rgba[..., 0] == 128] == 255).all()


def test_caption_makes_the_png_taller_by_caption_height_and_leaves_the_grid(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    grid = metric_logging.image_grid(images)  # 2×2: 38×38
    assert grid.shape == (38, 38, 3)
    assert metric_logging.caption_height(38) == 19  # font size 10: 10 + 5 + 4
    plain = metric_logging.save_image_grid(images, tmp_path / "plain.png")
    np.testing.assert_array_equal(plain, grid)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain.png")), grid)

    caption = "step 10000 · EMA 0.9999 · 1 step"
    path = tmp_path / "deep" / "captioned.png"  # folders made as needed
    written = metric_logging.save_image_grid(images, str(path), caption=caption)
    png = np.asarray(Image.open(path))
    np.testing.assert_array_equal(png, written)
    assert png.shape == (38 + 19, 38, 3)
    np.testing.assert_array_equal(png[19:], grid)
    strip = png[:19]
    assert (strip[..., 0] == strip[..., 1]).all()  # grey levels: black text on white
    assert (strip < 128).any() and (strip == 255).mean() > 0.5
    # A wide grid gets a larger font and a taller strip (capped at size 32).
    assert metric_logging.caption_height(24 * 20) == 20 + 10 + 4
    assert metric_logging.caption_height(10_000) == 32 + 16 + 4


def test_single_channel_grid_saves_as_grey_png(tmp_path):
    images = tiles(2, c=1)
    written = metric_logging.save_image_grid(images, tmp_path / "g.png", caption="σ grey")
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), written[..., 0])
    assert written.shape == (metric_logging.caption_height(12) + 6, 12, 1)


# --------------------------------------------------------------------------- config and JSONL
def test_config_hparams_flatten_with_dots_stringify_sequences_and_skip_none():
    config = {
        "train": {"lr": np.float32(0.5), "steps": 3, "ema_rates": (0.9999, 0.99), "opt": None},
        "model": {"name": "ncsnpp", "attn": [16], "dropout": False, "empty": {}},
        "seed": np.int64(7),
    }
    assert metric_logging.config_hparams(config) == {
        "train.lr": 0.5,
        "train.steps": 3,
        "train.ema_rates": "[0.9999, 0.99]",
        "model.name": "ncsnpp",
        "model.attn": "[16]",
        "model.dropout": False,
        "seed": 7,
    }
    assert type(metric_logging.config_hparams(config)["seed"]) is int
    text = metric_logging.config_markdown(config)
    assert text.startswith("```json\n") and text.endswith("\n```")
    assert json.loads(text[len("```json\n") : -len("\n```")])["train"]["steps"] == 3


def test_jsonl_has_scalars_only_and_keeps_strings(tmp_path):
    writer = metric_logging.create_writer(tmp_path, tensorboard=False)
    writer.write_scalars(4, {"loss": np.float32(0.25), "fid": "no reference statistics"})
    writer.write_images(4, {"samples/ema_0.9999": np.zeros((6, 6, 3), np.uint8)})
    writer.write_config(cifar10_ict.get_config("test"), step=4)
    writer.write_texts(4, {"note": "hello"})
    writer.write_scalars(8, {"loss": 0.125})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [
        {"step": 4, "loss": 0.25, "fid": "no reference statistics"},
        {"step": 8, "loss": 0.125},
    ]
    # Appends on reopening (a resumed run).
    writer = metric_logging.create_writer(tmp_path, tensorboard=False)
    writer.write_scalars(12, {"loss": 1})
    writer.close()
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 3
    # jsonl=False (--mode=eval) leaves metrics.jsonl alone.
    other = tmp_path / "other"
    metric_logging.create_writer(other, jsonl=False, tensorboard=False).close()
    assert not (other / "metrics.jsonl").exists()


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(metric_logging.jax, "process_index", lambda: 1)
    writer = metric_logging.create_writer(tmp_path / "run")
    assert writer.writers == ()
    writer.write_scalars(1, {"loss": 1.0})
    writer.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    writer.write_config({"a": 1})
    writer.close()
    assert metric_logging.write_eval_scalars(tmp_path / "run", 1, {"fid": 1.0}) == {}
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------- TensorBoard
def _read_events(logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        str(logdir),
        size_guidance={ea.TENSORS: 0, ea.SCALARS: 0, ea.IMAGES: 0, ea.HISTOGRAMS: 0},
    )
    acc.Reload()
    return acc


def test_tensorboard_scalars_images_config_hparams_and_eval_scalars(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    config = cifar10_ict.get_config("test")
    grid = metric_logging.image_grid(tiles(5, h=4, w=4), num_columns=3)
    writer = metric_logging.create_writer(tmp_path)
    assert isinstance(writer.writers[-1], metric_logging.TensorBoardWriter)
    writer.write_config(config)
    writer.write_scalars(10, {"loss": 0.5, "fid": "no reference statistics"})
    writer.write_scalars(20, {"loss": np.float32(0.25)})
    writer.write_images(20, {"samples/ema_0.9999": grid})
    writer.write_scalars(20, {"fid": 12.5})  # the training FID hook
    writer.close()
    # --mode=eval, a separate process after training: the run's step, its own event file.
    written = metric_logging.write_eval_scalars(
        tmp_path,
        20,
        {"fid": 3.25, "sfid": np.float64(4.5), "precision": 0.75, "kid": "no features"},
    )
    assert written == {"eval/fid": 3.25, "eval/sfid": 4.5, "eval/precision": 0.75}
    events = sorted(os.listdir(tmp_path / "tensorboard"))
    assert len(events) == 2 and all(e.startswith("events.out.tfevents.") for e in events)

    acc = _read_events(tmp_path / "tensorboard")
    # TF2 summaries come back as tensors (with each plugin's metadata), not "scalars"/"images".
    tags = set(acc.Tags()["tensors"])
    assert tags == {
        "loss",
        "fid",
        "samples/ema_0.9999",
        "config",
        "_hparams_/session_start_info",
        "eval/fid",
        "eval/sfid",
        "eval/precision",
    }
    plugin = lambda tag: acc.SummaryMetadata(tag).plugin_data.plugin_name
    value = lambda event: tensor_util.make_ndarray(event.tensor_proto)
    assert {plugin(t) for t in ("loss", "fid", "eval/fid", "eval/sfid")} == {"scalars"}
    assert [(e.step, float(value(e))) for e in acc.Tensors("loss")] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, float(value(e))) for e in acc.Tensors("fid")] == [(20, 12.5)]  # string: no
    for tag, expected in written.items():
        [event] = acc.Tensors(tag)
        assert event.step == 20 and float(value(event)) == pytest.approx(expected)

    # The image: [width, height, PNG] strings; the PNG is the grid, pixel for pixel.
    assert plugin("samples/ema_0.9999") == "images"
    [event] = acc.Tensors("samples/ema_0.9999")
    width, height, png = value(event)
    assert (int(width), int(height)) == (grid.shape[1], grid.shape[0])
    import io

    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), grid)

    # The config: its JSON in a markdown code block, at step 0.
    assert plugin("config") == "text"
    [event] = acc.Tensors("config")
    text = value(event).item().decode()
    assert event.step == 0 and text.startswith("```json\n") and text.endswith("\n```")
    assert json.loads(text[len("```json\n") : -len("\n```")]) == json.loads(
        config.to_json_best_effort()
    )

    # The hparams: flat, dotted, sequences as strings.
    assert plugin("_hparams_/session_start_info") == "hparams"
    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.batch_size"].number_value == config.train.batch_size
    assert hparams["model.name"].string_value == config.model.name
    assert hparams["data.random_flip"].bool_value == config.data.random_flip
    assert hparams["train.ema_rates"].string_value == json.dumps(list(config.train.ema_rates))
    assert set(hparams) == set(metric_logging.config_hparams(config))

    # Images, texts and hparams left metrics.jsonl alone; eval added nothing to it.
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [10, 20, 20]


def test_tensorboard_writer_rejects_float_images(tmp_path):
    pytest.importorskip("tensorflow")
    writer = metric_logging.TensorBoardWriter(tmp_path)
    with pytest.raises(TypeError, match="uint8"):
        writer.write_images(0, {"x": np.zeros((2, 2, 3), np.float32)})
    with pytest.raises(ValueError, match="C in 1, 3, 4"):
        writer.write_images(0, {"x": np.zeros((2, 2, 2), np.uint8)})
    writer.close()


# --------------------------------------------------------------------------------- gs:// paths
def test_gs_workdir_through_epath(tmp_path, monkeypatch):
    """etils' mock backend (the local file system) stands in for GCS: `gs://bucket/…` is
    redirected to tmp_path/gcs/bucket/…. TensorBoard's writer is TensorFlow's own file system,
    so what is checked there is the folder it is given."""
    root = tmp_path / "gcs"

    def local(path):
        path = str(path)
        assert path.startswith("gs://"), path  # no os.path call has mangled it
        return str(root / path[len("gs://") :])

    redirect = lambda original, path, *args, **kwargs: original(local(path), *args, **kwargs)
    seen = []

    class RecordingTensorBoard(metric_logging.ConsoleWriter):
        def __init__(self, logdir):
            seen.append(str(logdir))

    monkeypatch.setattr(metric_logging, "TensorBoardWriter", RecordingTensorBoard)
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)  # TF's GCS client
    mocks = {name: redirect for name in ("open", "exists", "makedirs", "mkdir", "isdir")}
    with epath_testing.mock_epath(**mocks):
        writer = metric_logging.create_writer("gs://bucket/run")
        writer.write_scalars(1, {"loss": 1.0})
        writer.flush()
        writer.write_scalars(2, {"loss": 0.5, "fid": "unavailable"})
        writer.close()
        writer = metric_logging.create_writer(epath.Path("gs://bucket/run"))  # resumed
        writer.write_scalars(3, {"loss": 0.25})
        writer.close()
        grid = metric_logging.save_image_grid(
            tiles(3), "gs://bucket/run/samples/step_00000003.png", caption="step 3"
        )
    assert seen == ["gs://bucket/run/tensorboard"] * 2
    rows = [json.loads(line) for line in open(root / "bucket" / "run" / "metrics.jsonl")]
    assert rows == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5, "fid": "unavailable"},
        {"step": 3, "loss": 0.25},
    ]
    png = root / "bucket" / "run" / "samples" / "step_00000003.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
