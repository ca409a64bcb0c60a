"""Training batches: the step-indexed order of a dataset's examples and the iterator that
serves them to the devices.

1. The order: `batch_indices`, `flip_mask` and `host_batch` are pure functions of
   (seed, step, batch size, dataset size). The batch for step `s` never depends on how many
   batches were drawn before, or on how the data is stored, so a run resumed at step `s`
   after pre-emption sees exactly the data an uninterrupted run would have seen. On several
   processes each one builds only its block of rows (`process_rows`), and the blocks
   concatenate to the one-process batch.
2. `TrainIterator`: builds those batches in a background thread, one process's rows at a
   time, and assembles them into global `jax.Array`s with the caller's sharding.

The datasets themselves (`data.Dataset`: in memory or streamed) come from data.py.
"""

from __future__ import annotations

import dataclasses
import functools
import queue
import threading

import jax
import numpy as np

from cm_jax.data import Dataset, normalize

# ----------------------------------------------------------------------------------------
# The step-indexed order
# ----------------------------------------------------------------------------------------

# Mixed into the flip generator's seed so flips never share a random stream with the epoch
# permutation of the same number (the permutation of epoch e is seeded with [seed, e]).
_FLIP_STREAM = 0x666C6970  # "flip"


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of range(N) from rng([seed, epoch]).

    Cached because consecutive steps reuse it (ImageNet's 1.28M-element permutation costs
    tens of milliseconds). Read-only, so no caller can alter the cached copy.
    """
    permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
    permutation.flags.writeable = False
    return permutation


def batch_indices(step: int, global_batch_size: int, num_examples: int, seed: int) -> np.ndarray:
    """Example indices of global batch `step`: stream positions [step*B, (step+1)*B).

    The stream is epoch 0's permutation, then epoch 1's, and so on, so every epoch covers
    each example exactly once; a batch may straddle an epoch boundary.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if num_examples <= 0:
        raise ValueError(f"dataset is empty (num_examples={num_examples})")
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty(global_batch_size, np.int64)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = _epoch_permutation(seed, int(epoch), num_examples)[offsets[in_epoch]]
    return indices


def flip_mask(step: int, global_batch_size: int, seed: int) -> np.ndarray:
    """Which rows of global batch `step` are mirrored left-right: a fair coin per row."""
    rng = np.random.default_rng([seed, step, _FLIP_STREAM])
    return rng.random(global_batch_size) < 0.5


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of the global batch that process `process_index` produces: its 1/P block."""
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the process count "
            f"{process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    rows_per_process = global_batch_size // process_count
    return slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)


def host_batch(
    dataset: Dataset,
    step: int,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`, as numpy: the iterator's whole host work.

    Indices and flips are drawn for the full global batch and then sliced, so the rows of
    processes 0..P-1 concatenate to exactly the single-process batch; `dataset.gather` is
    asked for this process's rows only, so a streamed dataset reads and decodes no others.
    """
    rows = process_rows(global_batch_size, process_index, process_count)
    indices = batch_indices(step, global_batch_size, dataset.num_examples, seed)[rows]
    images, labels = dataset.gather(indices)  # fresh arrays, so flipping in place is safe
    if random_flip:
        flips = flip_mask(step, global_batch_size, seed)[rows]
        images[flips] = images[flips, :, ::-1]
    return {"image": normalize(images), "label": labels.astype(np.int32)}


# ----------------------------------------------------------------------------------------
# The iterator
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _ProducerFailed:
    """Put on the queue by the background thread in place of a batch when it fails."""

    error: BaseException


class TrainIterator:
    """Yields (step, batch) for step = start_step, start_step+1, ... ; batch = {'image':
    jax.Array [B,H,W,C] float32 in [-1,1], 'label': jax.Array [B] int32} placed with
    `sharding` (a jax.sharding.NamedSharding over the batch axis).

    With `steps_per_call > 1`, `steps_per_call` consecutive steps are stacked for a
    `lax.scan` training step: arrays are [steps_per_call, B, ...], `sharding` must be the
    one for that stacked shape (batch axis 1), and the iterator yields
    (first_step_of_group, stacked_batch), advancing by `steps_per_call`.

    Batches are built (gather, which for a streamed dataset reads and decodes the rows in
    its own thread pool; flip; uint8 -> float; transfer) in a background thread that runs at
    most `prefetch` items ahead. An exception in that thread is raised by the next
    `next()`. Call `close()` or use the iterator as a context manager to stop the thread.

    Each process produces only its own rows of every global batch
    (`process_rows(B, jax.process_index(), jax.process_count())`); `sharding` must place
    those rows on this process's devices, as a mesh built from `jax.devices()` in order
    does.
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch_size: int,
        sharding,
        start_step: int,
        seed: int,
        random_flip: bool,
        prefetch: int = 2,
        steps_per_call: int = 1,
    ):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
        self._dataset = dataset
        self._global_batch_size = global_batch_size
        self._seed = seed
        self._random_flip = random_flip
        self._steps_per_call = steps_per_call
        self._process_index, self._process_count = jax.process_index(), jax.process_count()
        rows = process_rows(global_batch_size, self._process_index, self._process_count)

        stack = (steps_per_call,) if steps_per_call > 1 else ()
        self._global_shapes = {
            "image": stack + (global_batch_size,) + dataset.image_shape,
            "label": stack + (global_batch_size,),
        }
        self._shardings = {
            key: _sharding_for_rank(sharding, len(shape))
            for key, shape in self._global_shapes.items()
        }
        _check_sharding_holds_rows(
            self._shardings["label"], self._global_shapes["label"], len(stack), rows
        )

        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._produce, args=(start_step,), name="TrainIterator", daemon=True
        )
        self._thread.start()

    # -- consumer side ---------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, dict[str, jax.Array]]:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise StopIteration
        item = self._take()
        if isinstance(item, _ProducerFailed):
            self._error = item.error
            self.close()
            raise item.error
        return item

    def _take(self):
        """Wait for the next item, noticing a producer that died without leaving one."""
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:  # it may have put its last item just before the check
                        return self._queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("TrainIterator's producer thread stopped") from None

    def close(self) -> None:
        """Stop the background thread and drop the batches it had prepared. Idempotent."""
        self._closed = True
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # -- producer side (background thread) -------------------------------------------

    def _produce(self, start_step: int) -> None:
        step = start_step
        try:
            while not self._stop.is_set():
                if not self._put((step, self._device_batch(step))):
                    return
                step += self._steps_per_call
        except BaseException as error:  # surfaced by the consumer's next()
            self._put(_ProducerFailed(error))

    def _put(self, item) -> bool:
        """Queue `item`, giving up (False) if the iterator is closed while the queue is full."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _device_batch(self, first_step: int) -> dict[str, jax.Array]:
        local = self._host_batch_group(first_step)
        return {
            key: jax.make_array_from_process_local_data(
                self._shardings[key], value, self._global_shapes[key]
            )
            for key, value in local.items()
        }

    def _host_batch_group(self, first_step: int) -> dict[str, np.ndarray]:
        """This process's rows for steps first_step .. first_step+steps_per_call-1."""
        batches = [
            host_batch(
                self._dataset,
                first_step + offset,
                self._global_batch_size,
                self._seed,
                self._random_flip,
                self._process_index,
                self._process_count,
            )
            for offset in range(self._steps_per_call)
        ]
        if self._steps_per_call == 1:
            return batches[0]
        return {key: np.stack([batch[key] for batch in batches]) for key in batches[0]}


def _sharding_for_rank(sharding, rank: int):
    """The image sharding reused for the lower-rank labels: drop spec entries past `rank`.

    So a caller may pass P('data', None, None, None) as well as P('data').
    """
    if isinstance(sharding, jax.sharding.NamedSharding) and len(sharding.spec) > rank:
        return jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[:rank])
        )
    return sharding


def _check_sharding_holds_rows(sharding, global_shape: tuple, batch_axis: int, rows: slice):
    """Raise unless this process's devices hold exactly the batch rows it produces.

    `make_array_from_process_local_data` lays the local rows onto whatever part of the
    batch this process's devices address; if that is not the block `host_batch` made, the
    global batch would silently hold the wrong (or duplicated) examples.
    """
    size = global_shape[batch_axis]
    held = [
        index[batch_axis].indices(size)[:2]
        for index in sharding.addressable_devices_indices_map(global_shape).values()
    ]
    first, last = min(start for start, _ in held), max(stop for _, stop in held)
    if (first, last) != (rows.start, rows.stop):
        raise ValueError(
            f"the sharding puts batch rows [{first}, {last}) on this process's devices, but "
            f"process {jax.process_index()} of {jax.process_count()} produces rows "
            f"[{rows.start}, {rows.stop}); shard the batch axis (axis {batch_axis}) over a "
            "mesh built from jax.devices() in order"
        )
