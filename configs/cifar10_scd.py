"""CIFAR-10 sCD: sCM's continuous-time consistency distillation.

sCD: continuous-time consistency distillation on CIFAR-10 (Lu & Song, ICLR 2025): the
tangent's velocity is the EDM teacher's, σ_d·F_teacher(x_t/σ_d, t), and the student starts
from the teacher. The paper's teacher has positional time embeddings (`cifar10_edm.py:scm`);
the recipe and its sources are in `configs.common.scm_config`.

    python launch.py --config=configs/cifar10_edm.py:scm --workdir=workdirs/edm_scm
    python launch.py --config=configs/cifar10_scd.py --workdir=workdirs/scd \
        --config.teacher.workdir=workdirs/edm_scm

Variants: paper (default), `cpu` (distils a `cifar10_edm.py:cpu` teacher, 600 steps), `test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    return common.scm_config("scd", variant)
