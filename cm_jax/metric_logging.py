"""Where metrics, images and the config go: TensorBoard, a JSON-lines file, the console, PNG grids.

`create_writer(workdir)` returns one writer for a run (only process 0 writes anything):

  * `workdir/metrics.jsonl`: one JSON object per `write_scalars`, {"step": k, name: value, ...};
    needs nothing and is easy to parse. Images, texts and hparams do not go there.
  * the console (absl logging): scalars.
  * `workdir/tensorboard/`: scalars, image grids, the config as text and its flat fields as
    hparams, through clu's TensorFlow summary writer, where TensorFlow is installed (not in the
    GPU image, nor in a slim install: there this part is left out). Each writer opens a new
    event file, so an evaluation run after training (`create_writer(workdir, jsonl=False)`, or
    `write_eval_scalars`) adds its events to the same folder without touching the training's.
    Values that are not numbers (a string saying why a metric is unavailable) are skipped there.

Paths go through `etils.epath`, so a `gs://bucket/run` workdir works as well as a local one.
"""

import json
import math
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image, ImageDraw, ImageFont

CONFIG_TAG = "config"


def _as_number(value):
    """float(value) for a number (Python, NumPy or a one-element array), else None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        array = np.asarray(value)
    except Exception:  # Anything that is not array-like is not a number.
        return None
    if array.size != 1 or array.dtype.kind not in "biuf":
        return None
    return float(array.reshape(()))


def _is_remote(path):
    return "://" in str(path)


def _json_value(value):
    number = _as_number(value)
    if number is not None:
        return number
    if value is None or isinstance(value, str):
        return value
    return str(value)


# ----------------------------------------------------------------------------------- writers
class _ScalarsOnly:
    """A writer of scalars alone: images, texts and hparams are skipped."""

    def write_images(self, step, images):
        pass

    def write_texts(self, step, texts):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class JsonlWriter(_ScalarsOnly):
    """Appends one JSON object per `write_scalars`: {"step": k, name: value, ...}.

    Numbers are written as floats; other values (a string saying why a metric is unavailable)
    as they are. Images, texts and hparams are skipped. A local file is opened for appending;
    on object storage (`gs://…`), which cannot append, the file is read once and rewritten
    whole at each flush that has new rows.
    """

    def __init__(self, path):
        self._path = epath.Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._remote = _is_remote(path)
        if self._remote:
            self._text = self._path.read_text() if self._path.exists() else ""
            self._dirty = False
            self._file = None
        else:
            self._file = self._path.open("a", encoding="utf-8")

    def write_scalars(self, step, scalars):
        row = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
        line = json.dumps(row) + "\n"
        if self._remote:
            self._text += line
            self._dirty = True
        else:
            self._file.write(line)

    def flush(self):
        if self._remote:
            if self._dirty:
                with self._path.open("w") as f:
                    f.write(self._text)
                self._dirty = False
        else:
            self._file.flush()

    def close(self):
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


class ConsoleWriter(_ScalarsOnly):
    """Scalars to absl logging; images, texts and hparams are skipped."""

    def write_scalars(self, step, scalars):
        parts = []
        for k, v in scalars.items():
            number = _as_number(v)
            parts.append(f"{k}={number:.6g}" if number is not None else f"{k}={v}")
        logging.info("[%d] %s", step, ", ".join(parts))


class TensorBoardWriter:
    """clu's TensorFlow summary writer (a new event file in `logdir`), which skips scalars that
    are not numbers and takes images as uint8 [N, H, W, C] or [H, W, C] (C = 1, 3 or 4).

    Raises ImportError where TensorFlow (or clu's TensorBoard part) is missing.
    """

    def __init__(self, logdir):
        from clu.metric_writers import SummaryWriter  # Imports TensorFlow.

        self.logdir = str(logdir)
        self._writer = SummaryWriter(self.logdir)

    def write_scalars(self, step, scalars):
        numbers = {k: _as_number(v) for k, v in scalars.items()}
        numbers = {k: v for k, v in numbers.items() if v is not None}
        if numbers:
            self._writer.write_scalars(int(step), numbers)

    def write_images(self, step, images):
        batches = {}
        for key, image in images.items():
            image = np.asarray(image)
            if image.dtype != np.uint8:
                raise TypeError(f"write_images wants uint8 images; {key!r} is {image.dtype}.")
            if image.ndim == 2:
                image = image[..., None]
            if image.ndim == 3:
                image = image[None]
            if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"write_images wants [N, H, W, C] or [H, W, C] with C in 1, 3, 4; "
                    f"{key!r} has shape {image.shape}."
                )
            batches[key] = image
        if batches:
            self._writer.write_images(int(step), batches)

    def write_texts(self, step, texts):
        self._writer.write_texts(int(step), {k: str(v) for k, v in texts.items()})

    def write_hparams(self, hparams):
        if hparams:
            self._writer.write_hparams(hparams)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter:
    """Forwards every call to each of its writers."""

    def __init__(self, writers):
        self._writers = list(writers)

    @property
    def writers(self):
        return tuple(self._writers)

    def write_scalars(self, step, scalars):
        for w in self._writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        """images: {tag: uint8 [H, W, C] or [N, H, W, C]}; TensorBoard only."""
        for w in self._writers:
            w.write_images(step, images)

    def write_texts(self, step, texts):
        """texts: {tag: markdown string}; TensorBoard only."""
        for w in self._writers:
            w.write_texts(step, texts)

    def write_hparams(self, hparams):
        """hparams: {name: bool, int, float or str}; TensorBoard only."""
        for w in self._writers:
            w.write_hparams(hparams)

    def write_config(self, config, step=0):
        """The whole config as JSON in a markdown code block (text tag "config", at `step`) and
        its flat fields as hparams (see `config_hparams`); TensorBoard only."""
        if not self._writers:
            return
        self.write_texts(step, {CONFIG_TAG: config_markdown(config)})
        self.write_hparams(config_hparams(config))

    def flush(self):
        for w in self._writers:
            w.flush()

    def close(self):
        for w in self._writers:
            w.close()


def create_writer(workdir, *, jsonl=True, console=True, tensorboard=True):
    """The run's writer: `workdir/metrics.jsonl` (jsonl), absl logging (console) and
    `workdir/tensorboard/` (tensorboard, where TensorFlow imports). On processes other than 0,
    a writer that writes nothing. `--mode=eval` passes jsonl=False: it adds TensorBoard events
    to the run's folder (a new event file) and keeps its own eval/metrics.jsonl."""
    if jax.process_index() > 0:
        return MultiWriter([])
    workdir = epath.Path(workdir)
    writers = []
    if jsonl:
        writers.append(JsonlWriter(workdir / "metrics.jsonl"))
    if console:
        writers.append(ConsoleWriter())
    if tensorboard:
        try:
            writers.append(TensorBoardWriter(workdir / "tensorboard"))
        except ImportError as error:
            logging.log_first_n(
                logging.INFO, "No TensorBoard events (%s): metrics.jsonl and the console.", 1, error
            )
    return MultiWriter(writers)


def write_eval_scalars(workdir, step, metrics, prefix="eval/"):
    """Adds `metrics`' numbers as TensorBoard scalars `prefix + name` at the run's training
    `step` to `workdir/tensorboard/` (a new event file; nothing else is written). Values that
    are not numbers are skipped. Returns {tag: value} of what was written (empty on processes
    other than 0, or where TensorFlow is missing)."""
    numbers = {prefix + k: _as_number(v) for k, v in metrics.items()}
    numbers = {k: v for k, v in numbers.items() if v is not None}
    writer = create_writer(workdir, jsonl=False, console=False)
    try:
        if not writer.writers or not numbers:
            return {}
        writer.write_scalars(step, numbers)
    finally:
        writer.close()
    return numbers


# ------------------------------------------------------------------------------------ config
def _config_dict(config):
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict, FrozenConfigDict
        return config.to_dict()
    return dict(config)


def config_markdown(config):
    """The config as indented JSON in a markdown code block."""
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2)
    else:
        text = json.dumps(_config_dict(config), indent=2, default=str)
    return f"```json\n{text}\n```"


def config_hparams(config):
    """The config's fields as {"a.b.c": value}: numbers and strings as they are, tuples and
    lists (and anything else) as strings (JSON where it can), None and empty dicts left out."""
    flat = {}

    def visit(prefix, value):
        if isinstance(value, Mapping) or hasattr(value, "to_dict"):
            for k, v in _config_dict(value).items():
                visit(f"{prefix}{k}.", v)
            return
        name = prefix[:-1]
        if value is None:
            return
        if isinstance(value, (bool, str)):
            flat[name] = value
        elif isinstance(value, (int, float, np.integer, np.floating)):
            flat[name] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, (tuple, list)):
            try:
                flat[name] = json.dumps(list(value))
            except TypeError:
                flat[name] = str(list(value))
        else:
            flat[name] = str(value)

    visit("", config)
    return flat


# ------------------------------------------------------------------------------------- grids
def image_grid(images_uint8, num_columns=None, padding=2, pad_value=128):
    """Tile [N, H, W, C] uint8 images into one image with `padding` pixels of `pad_value` (mid
    grey) between the tiles and around them: [rows·H + (rows+1)·padding,
    cols·W + (cols+1)·padding, C]. Blank cells are `pad_value` too; an alpha channel is opaque
    there. padding=0 gives the plain [rows·H, cols·W, C] tiling."""
    images_uint8 = np.asarray(images_uint8)
    n, h, w, c = images_uint8.shape
    cols = num_columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    p = int(padding)
    grid = np.full((rows * h + (rows + 1) * p, cols * w + (cols + 1) * p, c), pad_value, np.uint8)
    if c == 4:
        grid[..., 3] = 255
    for k in range(n):
        r, q = divmod(k, cols)
        top, left = p + r * (h + p), p + q * (w + p)
        grid[top : top + h, left : left + w] = images_uint8[k]
    return grid


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the bitmap font.
        return ImageFont.load_default()


def _caption_font_size(width):
    return int(np.clip(width // 24, 10, 32))


def caption_height(width):
    """How many rows a caption adds to an image `width` pixels wide."""
    size = _caption_font_size(width)
    return size + size // 2 + 4


def add_caption(grid, caption, background=255, color=0):
    """uint8 [H, W, C] `grid` with a strip of caption_height(W) rows above it: one line of
    `caption`, centred, in Pillow's default font (smaller where it would not fit; where even
    the smallest does not, left-aligned and cut at the right edge)."""
    grid = np.asarray(grid)
    h, w, c = grid.shape
    strip_h = caption_height(w)
    size = _caption_font_size(w)
    font = _font(size)
    draw_probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    if isinstance(font, ImageFont.FreeTypeFont):
        while size > 6 and draw_probe.textlength(caption, font=font) > w - 4:
            size -= 1
            font = _font(size)
    else:  # The bitmap font knows Latin-1 only.
        caption = caption.encode("latin-1", "replace").decode("latin-1")
    strip = Image.new("L", (w, strip_h), background)
    draw = ImageDraw.Draw(strip)
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    x = max((w - (right - left)) // 2, 2) - left  # Where it does not fit: its start shows.
    y = (strip_h - (bottom - top)) // 2 - top
    draw.text((x, y), caption, fill=color, font=font)
    strip = np.asarray(strip)[..., None].repeat(c, axis=-1)
    if c == 4:
        strip[..., 3] = 255
    return np.concatenate([strip, grid], axis=0)


def save_image_grid(images_uint8, path, num_columns=None, caption=None, padding=2):
    """Writes the grid of `images_uint8` ([N, H, W, C] uint8) as a PNG at `path` (local or
    `gs://…`), with one line of `caption` above it if given. Returns the image written
    (uint8 [H', W', C]), e.g. for `writer.write_images`."""
    grid = image_grid(np.asarray(images_uint8), num_columns, padding=padding)
    if caption:
        grid = add_caption(grid, caption)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")
    return grid
