"""cm_jax: consistency models (CD, CT, iCT, ECT, sCM) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="cm_jax",
    version="0.1.0",
    description=(
        "Consistency models in JAX/Flax: paper-exact recipes, sharded training, safe resume."
    ),
    packages=find_packages(include=["cm_jax", "cm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.12.4",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "absl-py",
        "numpy>=1.26",
        "scipy",
        "pillow",
        "tqdm",
        # Streaming reads of converted datasets (cm_jax.convert_data, data_arrayrecord.py).
        "grain>=0.2.18",
        "array-record>=0.8.6",
    ],
    extras_require={
        # Reading tfds datasets and writing TensorBoard events; training from local npz
        # shards needs none of it.
        "data": [
            "tensorflow-cpu",
            "tensorflow-datasets",
            "tensorboard",
            "importlib_resources",
        ],
        "test": ["pytest", "pytest-xdist>=2.5", "ruff==0.17.6"],
    },
)
