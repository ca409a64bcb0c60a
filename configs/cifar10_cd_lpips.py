"""CIFAR-10 consistency distillation (CD) with LPIPS, the CM paper's one-step FID 3.55.

Consistency distillation (CD) on CIFAR-10 with the lpips metric (CM paper; see
`configs.common.cd_config` for the recipe). RAdam lr 4e-4.

    python launch.py --config=configs/cifar10_cd_lpips.py --workdir=workdirs/cd_lpips \
        --config.teacher.workdir=workdirs/edm

LPIPS needs the ImageNet VGG16 backbone, which no package ships: give its file with
--config.loss.lpips_vgg_path. The `:cpu` and `:test` variants use l2 instead (a 224×224 VGG16
per image is too slow on a CPU).

Variants: paper (default), `:cpu` (distils from a `cifar10_edm.py:cpu` teacher), `:test`.
"""

from configs import common

# What get_config(variant) accepts besides None (the paper recipe); launch.py --help lists them.
VARIANTS = ("cpu", "test")


def get_config(variant=None):
    c = common.cd_config("lpips", 4e-4, variant)
    # editing_multistep_sampling.ipynb: ts = (0, 11, 17) on the train_N = 18 grid.
    c.sample.update(two_step_ts=(0, 11, 17), num_scales=18)
    return c
