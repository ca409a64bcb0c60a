"""CIFAR-10 consistency distillation (CD) with the l2 metric, from an EDM teacher run.

Consistency distillation (CD) on CIFAR-10 with the l2 metric (CM paper; see
`configs.common.cd_config` for the recipe). RAdam lr 4e-4.

    python launch.py --config=configs/cifar10_cd_l2.py --workdir=workdirs/cd_l2 \
        --config.teacher.workdir=workdirs/edm

Variants: paper (default), `:cpu` (distils from a `cifar10_edm.py:cpu` teacher), `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    return common.cd_config("l2", 4e-4, variant)
