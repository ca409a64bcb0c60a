"""Per-device memory of the train state and the frozen networks under FSDP (`mesh.fsdp`).

    python benchmarks/memory_table.py                       # ImageNet-64 CD, CT; LSUN-256 CD
    python benchmarks/memory_table.py --fsdp 1,2,4,8,16,32 --recipes cd64

Computed from shapes, on no device: `jax.eval_shape` of the state initialiser the trainer uses
(θ, θ⁻, the evaluation EMAs, the optimizer's state, the step and the rng key), the frozen
networks `trainer.load_frozen_networks` loads (the EDM teacher, where the method keeps it
frozen, and LPIPS's VGG16 with its heads), and the sharding rule `train_state.fsdp_spec`
applied to every array: what one device holds is its shard shape, PartitionSpec arithmetic,
so meshes larger than this machine's are priced exactly (per device it depends on fsdp alone,
not on the data axis). Activations and XLA's temporaries come on top; under FSDP they include
the weights of the layer being all-gathered.
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm_jax import lpips, methods, models, optim, train_state  # noqa: E402
from cm_jax.models import uncertainty  # noqa: E402
from configs import imagenet64_cd, imagenet64_ct, lsun256_cd  # noqa: E402

RECIPES = {
    "cd64": ("ImageNet-64 CD (LPIPS)", imagenet64_cd),
    "ct64": ("ImageNet-64 CT (LPIPS)", imagenet64_ct),
    "cd256": ("LSUN-256 CD (LPIPS, bedroom)", lsun256_cd),
}
GB = 1e9


def frozen_shapes(config, net):
    """{"teacher": …, "lpips": …} as the trainer holds them after `initial_student`: the
    teacher's network params where the loss reads it (CD, sCD; CT and ECT only start from it),
    LPIPS where the loss distance is LPIPS."""
    method, frozen = methods.of(config), {}
    if method.distills:  # `initial_student` takes it out of `frozen` for the others
        shapes = jax.eval_shape(lambda: train_state.init_params(config, net, jax.random.PRNGKey(0)))
        frozen["teacher"] = uncertainty.split(shapes)[0]
    if method.uses_loss_distance and config.loss.distance == "lpips":
        frozen["lpips"] = {
            name: jax.ShapeDtypeStruct(shape, np.float32)
            for name, shape in lpips.param_shapes().items()
        }
    return frozen


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def rows(recipe, fsdps):
    title, module = RECIPES[recipe]
    config = module.get_config()
    net = models.create_model(config.model)
    tx, _ = optim.make_optimizer(config.optim)
    state = train_state.state_shapes(config, net, tx)
    frozen = frozen_shapes(config, net)
    copies = count(state) / count(state.params)
    for fsdp in fsdps:
        state_bytes = train_state.per_device_bytes(state, fsdp)
        frozen_bytes = train_state.per_device_bytes(frozen, fsdp)
        whole = [
            x
            for x in jax.tree.leaves((state, frozen))
            if "fsdp" not in train_state.fsdp_spec(x.shape, fsdp)
        ]
        yield {
            "recipe": title,
            "params": count(state.params),
            "state_copies": copies,
            "frozen_params": count(frozen),
            "frozen": ", ".join(frozen) or "none",
            "fsdp": fsdp,
            "state_gb": state_bytes / GB,
            "frozen_gb": frozen_bytes / GB,
            "total_gb": (state_bytes + frozen_bytes) / GB,
            "whole_mb": train_state.per_device_bytes(whole, fsdp) / 1e6,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--fsdp", default="1,8,32")
    args = parser.parse_args()
    fsdps = [int(f) for f in args.fsdp.split(",")]
    print(
        "| recipe | θ params | state arrays (× θ) | frozen (params) | fsdp "
        "| state / device | frozen / device | total / device | of which not split |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        for row in rows(recipe, fsdps):
            print(
                f"| {row['recipe']} | {row['params']:,} | {row['state_copies']:.2f} "
                f"| {row['frozen']} ({row['frozen_params']:,}) | {row['fsdp']} "
                f"| {row['state_gb']:.2f} GB | {row['frozen_gb']:.3f} GB "
                f"| **{row['total_gb']:.2f} GB** | {row['whole_mb']:.1f} MB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
