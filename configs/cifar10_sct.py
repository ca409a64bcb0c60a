"""sCT: continuous-time consistency training on CIFAR-10 (Lu & Song, ICLR 2025, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models"); the recipe and its sources are in
`configs.common.scm_config`. From scratch; to start from an EDM run instead (FastGen's "sCT
with the EDM checkpoint", which also widens P_std to 1.8):

    python launch.py --config=configs/cifar10_sct.py --workdir=workdirs/sct
    python launch.py --config=configs/cifar10_sct.py --workdir=workdirs/sct_from_edm \
        --config.teacher.workdir=workdirs/edm --config.teacher.init_student=True \
        --config.loss.p_std=1.8 --config.model.embedding_type=fourier

Variants: paper (default), `cpu` (a 0.32M-parameter NCSN++, 600 steps), `test`.
"""
from configs import common


def get_config(variant=None):
    return common.scm_config("sct", variant)
