"""The step-indexed order of training batches and the iterator that serves them
(cm_jax/input_pipeline.py)."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cm_jax import data, input_pipeline


@pytest.fixture(scope="module")
def small_dataset():
    """40 random 8×8 images with labels in [0, 10)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    return data.ImageDataset(images=images, labels=rng.integers(0, 10, 40))


@pytest.fixture(scope="module")
def batch_mesh():
    return Mesh(np.array(jax.devices()), ("data",))


# -- the step-indexed order -------------------------------------------------------------


def test_each_epoch_covers_every_example_once():
    n, b, seed = 100, 7, 3  # batches straddle epoch boundaries
    stream = np.concatenate(
        [input_pipeline.batch_indices(s, b, n, seed) for s in range(3 * n // b + 1)]
    )
    for epoch in range(3):
        chunk = stream[epoch * n : (epoch + 1) * n]
        np.testing.assert_array_equal(np.sort(chunk), np.arange(n))
        np.testing.assert_array_equal(chunk, np.random.default_rng([seed, epoch]).permutation(n))
    assert not np.array_equal(stream[:n], stream[n : 2 * n])


def test_batch_larger_than_dataset_spans_several_epochs():
    indices = input_pipeline.batch_indices(1, 25, 10, seed=0)  # positions 25..49: epochs 2, 3, 4
    expected = np.concatenate([np.random.default_rng([0, e]).permutation(10) for e in range(5)])
    np.testing.assert_array_equal(indices, expected[25:50])


def test_order_depends_on_seed():
    assert not np.array_equal(
        input_pipeline.batch_indices(0, 50, 1000, 0), input_pipeline.batch_indices(0, 50, 1000, 1)
    )
    assert not np.array_equal(
        input_pipeline.flip_mask(0, 50, 0), input_pipeline.flip_mask(0, 50, 1)
    )


def test_flips_are_about_half_and_step_indexed():
    masks = np.stack([input_pipeline.flip_mask(s, 256, seed=0) for s in range(100)])
    assert masks.dtype == bool
    assert 0.48 < masks.mean() < 0.52
    np.testing.assert_array_equal(input_pipeline.flip_mask(57, 256, seed=0), masks[57])
    assert not np.array_equal(masks[0], masks[1])


def test_host_batch_applies_flips(small_dataset):
    step, b = 5, 16
    batch = input_pipeline.host_batch(small_dataset, step, b, seed=0, random_flip=True)
    indices = input_pipeline.batch_indices(step, b, small_dataset.num_examples, 0)
    flips = input_pipeline.flip_mask(step, b, 0)
    assert 0 < flips.sum() < b
    expected = small_dataset.images[indices]
    expected[flips] = expected[flips][:, :, ::-1]
    np.testing.assert_array_equal(data.to_uint8(batch["image"]), expected)
    np.testing.assert_array_equal(batch["label"], small_dataset.labels[indices])
    unflipped = input_pipeline.host_batch(small_dataset, step, b, seed=0, random_flip=False)
    np.testing.assert_array_equal(data.to_uint8(unflipped["image"]), small_dataset.images[indices])


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_rows_concatenate_to_the_global_batch(small_dataset, process_count):
    b = 16
    full = input_pipeline.host_batch(small_dataset, 3, b, seed=1, random_flip=True)
    parts = [
        input_pipeline.host_batch(
            small_dataset, 3, b, 1, True, process_index=i, process_count=process_count
        )
        for i in range(process_count)
    ]
    for key in full:
        assert all(len(part[key]) == b // process_count for part in parts)
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), full[key])


def test_batch_not_divisible_by_process_count_raises(small_dataset):
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        input_pipeline.host_batch(small_dataset, 0, 16, 0, True, process_index=0, process_count=3)


# -- the iterator -----------------------------------------------------------------------


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def test_iterator_yields_global_sharded_arrays(small_dataset, batch_mesh):
    sharding = NamedSharding(batch_mesh, P("data"))
    with input_pipeline.TrainIterator(
        small_dataset, 16, sharding, start_step=0, seed=0, random_flip=True
    ) as it:
        step, batch = next(it)
    assert step == 0
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == jnp.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == jnp.int32
    assert batch["image"].sharding == sharding
    assert len(batch["image"].addressable_shards) == 8
    assert batch["label"].sharding.spec == P("data")


def test_iterator_matches_host_batch_and_resumes_exactly(small_dataset, batch_mesh):
    sharding = NamedSharding(batch_mesh, P("data", None, None, None))
    args = dict(global_batch_size=16, sharding=sharding, seed=2, random_flip=True)
    with input_pipeline.TrainIterator(small_dataset, start_step=0, **args) as it:
        uninterrupted = take(it, 7)  # 7 * 16 > 40: crosses epoch boundaries
    with input_pipeline.TrainIterator(small_dataset, start_step=4, **args, prefetch=1) as it:
        resumed = take(it, 3)
    assert [step for step, _ in uninterrupted] == list(range(7))
    assert [step for step, _ in resumed] == [4, 5, 6]
    for (_, expected), (_, got) in zip(uninterrupted[4:], resumed):
        for key in expected:
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))
    for step, batch in uninterrupted:  # fresh pure computation after iterating
        fresh = input_pipeline.host_batch(small_dataset, step, 16, 2, True)
        for key in fresh:
            np.testing.assert_array_equal(np.asarray(batch[key]), fresh[key])


def test_iterator_stacks_steps_for_scan(small_dataset, batch_mesh):
    sharding = NamedSharding(batch_mesh, P(None, "data"))
    with input_pipeline.TrainIterator(
        small_dataset, 8, sharding, start_step=3, seed=0, random_flip=True, steps_per_call=2
    ) as it:
        groups = take(it, 2)
    assert [step for step, _ in groups] == [3, 5]
    step, batch = groups[1]
    assert batch["image"].shape == (2, 8, 8, 8, 3) and batch["label"].shape == (2, 8)
    assert batch["image"].sharding == sharding
    for offset in range(2):
        expected = input_pipeline.host_batch(small_dataset, step + offset, 8, 0, True)
        np.testing.assert_array_equal(np.asarray(batch["image"][offset]), expected["image"])
        np.testing.assert_array_equal(np.asarray(batch["label"][offset]), expected["label"])


def test_iterator_close_stops_thread(small_dataset, batch_mesh):
    sharding = NamedSharding(batch_mesh, P("data"))
    it = input_pipeline.TrainIterator(
        small_dataset, 8, sharding, start_step=0, seed=0, random_flip=False, prefetch=1
    )
    next(it)
    time.sleep(0.2)  # let the producer block on the full queue
    it.close()
    assert not it._thread.is_alive()
    it.close()  # idempotent
    with pytest.raises(StopIteration):
        next(it)


def test_iterator_surfaces_producer_errors(small_dataset, batch_mesh, monkeypatch):
    real_host_batch = input_pipeline.host_batch

    def failing_host_batch(dataset, step, *args, **kwargs):
        if step == 2:
            raise OSError("disk on fire")
        return real_host_batch(dataset, step, *args, **kwargs)

    monkeypatch.setattr(input_pipeline, "host_batch", failing_host_batch)
    sharding = NamedSharding(batch_mesh, P("data"))
    it = input_pipeline.TrainIterator(
        small_dataset, 8, sharding, start_step=0, seed=0, random_flip=False
    )
    assert [step for step, _ in take(it, 2)] == [0, 1]
    with pytest.raises(OSError, match="disk on fire"):
        next(it)
    assert not it._thread.is_alive()
    with pytest.raises(OSError, match="disk on fire"):
        next(it)


def test_sharding_check_rejects_sharding_that_misses_process_rows(batch_mesh):
    # In one process every device is addressable, so any sharding holds all rows; check
    # against the rows a second of two processes would produce instead.
    batch_sharded = NamedSharding(batch_mesh, P("data"))
    input_pipeline._check_sharding_holds_rows(batch_sharded, (8, 8), 0, slice(0, 8))
    batch_replicated = NamedSharding(batch_mesh, P(None, "data"))  # shards axis 1 instead
    with pytest.raises(ValueError, match="produces rows \\[4, 8\\)"):
        input_pipeline._check_sharding_holds_rows(batch_replicated, (8, 8), 0, slice(4, 8))


def test_iterator_rejects_bad_arguments(small_dataset, batch_mesh):
    sharding = NamedSharding(batch_mesh, P("data"))
    with pytest.raises(ValueError, match="prefetch must be >= 1"):
        input_pipeline.TrainIterator(small_dataset, 8, sharding, 0, 0, False, prefetch=0)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        input_pipeline.TrainIterator(small_dataset, 8, sharding, -1, 0, False)
