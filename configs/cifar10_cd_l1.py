"""CIFAR-10 consistency distillation (CD) with the l1 metric, from an EDM teacher run.

Consistency distillation (CD) on CIFAR-10 with the l1 metric (CM paper; see
`configs.common.cd_config` for the recipe). RAdam lr 2e-4.

    python launch.py --config=configs/cifar10_cd_l1.py --workdir=workdirs/cd_l1 \
        --config.teacher.workdir=workdirs/edm

Variants: paper (default), `:cpu` (distils from a `cifar10_edm.py:cpu` teacher), `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    return common.cd_config("l1", 2e-4, variant)
