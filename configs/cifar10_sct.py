"""CIFAR-10 sCT: sCM's continuous-time consistency training.

sCT: continuous-time consistency training on CIFAR-10 (Lu & Song, ICLR 2025, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"); the recipe and its sources are in
`configs.common.scm_config`. As in the paper, it starts from a diffusion teacher with positional
time embeddings; `--config.teacher.init_student=False` trains from scratch instead:

    python launch.py --config=configs/cifar10_edm.py:scm --workdir=workdirs/edm_scm
    python launch.py --config=configs/cifar10_sct.py --workdir=workdirs/sct \
        --config.teacher.workdir=workdirs/edm_scm

Variants: paper (default), `cpu` (a 0.32M-parameter NCSN++ from scratch, 600 steps), `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    return common.scm_config("sct", variant)
