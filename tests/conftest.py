"""Test set-up: 8 fake CPU devices for sharding tests and a persistent compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "cm_jax_jit")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A folder of two npz train shards of random 16×16 images, the `:test` configs' size."""
    folder = tmp_path_factory.mktemp("tiny_shards")
    rng = np.random.default_rng(0)
    for k in range(2):
        np.savez(folder / f"train-{k:05d}-of-00002.npz",
                 images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
                 labels=rng.integers(0, 10, 40))
    return str(folder)
