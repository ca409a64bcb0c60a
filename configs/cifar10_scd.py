"""sCD: continuous-time consistency distillation on CIFAR-10 (Lu & Song, ICLR 2025): the
tangent's velocity is the EDM teacher's, σ_d·F_teacher(x_t/σ_d, t), and the student starts
from the teacher (its network, hence `cifar10_edm.py`'s NCSN++). The paper reports sCD on
ImageNet with EDM2 networks; on CIFAR-10 this config takes sCT's recipe
(`configs.common.scm_config`) and adds the teacher.

    python launch.py --config=configs/cifar10_scd.py --workdir=workdirs/scd \
        --config.teacher.workdir=workdirs/edm

Variants: paper (default), `cpu` (distils a `cifar10_edm.py:cpu` teacher, 600 steps), `test`.
"""
from configs import common


def get_config(variant=None):
    return common.scm_config("scd", variant)
