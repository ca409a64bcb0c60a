"""Every value the official launch scripts, configs and code defaults fix for each CM recipe,
checked against this project's configs (configs only: no JAX computation).

Sources, read at these commits:
  openai/consistency_models_cifar10 @d086e77 (JAX, CIFAR-10: `configs/*.py`, `launch.sh`,
      `jcm/*.py`, `editing_multistep_sampling.ipynb`);
  openai/consistency_models @e32b69e (PyTorch, ImageNet 64 and LSUN 256: `scripts/launch.sh`,
      `scripts/*.py`, `cm/script_util.py`, `cm/karras_diffusion.py`, `cm/train_util.py`);
  locuslab/ect @4311059; Lu & Song, arXiv 2410.11081v2 (sCM), Appendix G.

The citation of every check is the comment block right above it (`repo:path:line value`). The
checks are soft: a test collects every mismatch of its recipe, with that citation, and fails
once at the end, so one run lists all the differences.

The teachers' dropout (`--teacher_dropout 0.1`, 0.13 on CIFAR-10) is not a field here: the
teacher is rebuilt from its own run's config and always called without dropout, as the official
code calls it in eval mode (test_distillation.py checks that its Heun step is deterministic).

Not checked, on purpose: `use_fp16=True` of every PyTorch run (this project's
`model.dtype="bfloat16"` is a choice, not the official value), and the length of the EDM
teachers on ImageNet 64 / LSUN 256, which the official loop leaves unbounded
(openai/consistency_models:cm/train_util.py:164, `lr_anneal_steps 0`).
"""

import importlib
import linecache
import math
import sys

import pytest

IN64_EMAS = (0.999, 0.9999, 0.9999432189950708)
LSUN_EMAS = (0.9999, 0.99994, 0.9999432189950708)


def _citation(depth):
    """The comment block above the caller's line `depth` frames up: the check's source."""
    frame = sys._getframe(depth)
    filename, n = frame.f_code.co_filename, frame.f_lineno - 1
    # A comment block covers the checks right below it.
    while n > 0 and linecache.getline(filename, n).strip().startswith(("r.eq(", "r.value(")):
        n -= 1
    lines = []
    while n > 0:
        text = linecache.getline(filename, n).strip()
        if not text.startswith("#"):
            break
        lines.insert(0, text.lstrip("#").strip())
        n -= 1
    return " / ".join(lines) or "(no citation)"


def _same(actual, expected):
    if isinstance(expected, bool):
        return actual is expected
    if isinstance(expected, float):
        return isinstance(actual, (int, float)) and math.isclose(actual, expected, rel_tol=1e-9)
    if isinstance(expected, tuple):
        try:
            actual = tuple(actual)
        except TypeError:
            return False
        return len(actual) == len(expected) and all(map(_same, actual, expected))
    return actual == expected


class Recipe:
    """A project config and the mismatches found against the official values."""

    def __init__(self, module, variant=None):
        self.label = f"configs/{module}.py:{variant}"
        self.config = importlib.import_module(f"configs.{module}").get_config(variant)
        self.problems = []

    def get(self, path):
        node = self.config
        for key in path.split("."):
            if key not in node:
                return False, None
            node = node[key]
        return True, node

    def eq(self, path, expected):
        found, actual = self.get(path)
        if not found:
            self.problems.append(f"{path}: missing (official {expected!r}) [{_citation(2)}]")
        elif not _same(actual, expected):
            self.problems.append(
                f"{path}: project {actual!r}, official {expected!r} [{_citation(2)}]"
            )

    def value(self, name, actual, expected):
        """A value derived from several fields (e.g. the curriculum's K)."""
        if not _same(actual, expected):
            self.problems.append(
                f"{name}: project {actual!r}, official {expected!r} [{_citation(2)}]"
            )

    def done(self):
        if self.problems:
            pytest.fail(
                f"{self.label}: {len(self.problems)} difference(s) from the official recipe:\n  "
                + "\n  ".join(self.problems),
                pytrace=False,
            )


def load_variant(module, variant):
    """The recipe, or a failing test that says which variant is missing."""
    try:
        return Recipe(module, variant)
    except ValueError as e:
        pytest.fail(f"configs/{module}.py has no variant {variant!r}: {e}", pytrace=False)


def curriculum_steps(r):
    """K of the N(k)/μ(k) curriculum: schedule.total_steps, or train.num_steps when 0."""
    return r.config.schedule.total_steps or r.config.train.num_steps


# ===========================================================================================
# CIFAR-10 (openai/consistency_models_cifar10, JAX)
# ===========================================================================================


def check_cifar10_ncsnpp(r):
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:45 model.name="ncsnpp"
    r.eq("model.name", "ncsnpp")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:49 nf=128
    r.eq("model.nf", 128)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:50 ch_mult=(2, 2, 2)
    r.eq("model.ch_mult", (2, 2, 2))
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:51 num_res_blocks=4
    r.eq("model.num_res_blocks", 4)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:52 attn_resolutions=(16,)
    r.eq("model.attn_resolutions", (16,))
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:53 resamp_with_conv=True
    r.eq("model.resamp_with_conv", True)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:55 fir=True
    r.eq("model.fir", True)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:56 fir_kernel=[1, 3, 3, 1]
    r.eq("model.fir_kernel", (1, 3, 3, 1))
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:57 skip_rescale=True
    r.eq("model.skip_rescale", True)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:58 resblock_type="biggan"
    r.eq("model.resblock_type", "biggan")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:59 progressive="none"
    r.eq("model.progressive", "none")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:60 progressive_input="residual"
    r.eq("model.progressive_input", "residual")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:61 progressive_combine="sum"
    r.eq("model.progressive_combine", "sum")
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:56 embedding "fourier"
    r.eq("model.embedding_type", "fourier")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:64 fourier_scale=16
    r.eq("model.fourier_scale", 16.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:63 init_scale=0.0
    r.eq("model.init_scale", 0.0)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:40 CIFAR10, unconditional
    r.eq("model.num_classes", 0)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:41 image_size=32
    r.eq("data.image_size", 32)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:42 random_flip=True
    r.eq("data.random_flip", True)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:53 t_min=0.002
    r.eq("karras.sigma_min", 0.002)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:54 t_max=80.0
    r.eq("karras.sigma_max", 80.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:66 rho=7.0
    r.eq("karras.rho", 7.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:67 data_std=0.5
    r.eq("karras.sigma_data", 0.5)


def test_cifar10_edm():
    r = Recipe("cifar10_edm")
    check_cifar10_ncsnpp(r)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:10 training.loss="dsm"
    r.eq("method", "edm")
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:58 dropout=0.13
    r.eq("model.dropout", 0.13)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:11 batch_size=512
    r.eq("train.batch_size", 512)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:12 n_iters=400001
    # (jcm/train.py:174 runs range(0, 400001 + 1, 2): about 400k steps)
    r.eq("train.num_steps", 400_000)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:63 optimizer="Adam"
    r.eq("optim.name", "adam")
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:64 lr=1e-3
    r.eq("optim.lr", 1e-3)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:65 beta1=0.9
    r.eq("optim.beta1", 0.9)
    # openai/consistency_models_cifar10:jcm/losses.py:65-70 optax.adamw without b2: 0.999
    r.eq("optim.beta2", 0.999)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:66 eps=1e-8
    r.eq("optim.eps", 1e-8)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:62 weight_decay=0
    r.eq("optim.weight_decay", 0.0)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:67 warmup=int(1e7/512)=19531
    r.eq("optim.warmup_steps", 19_531)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:68 grad_clip=inf (none)
    r.eq("optim.grad_clip", 0.0)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:32-34 ema_rate =
    # exp(ln 0.5 / (0.5e6/512)) = 0.99929047 (half-life 0.5M images)
    r.eq("train.ema_rates", (math.exp(math.log(0.5) / (0.5e6 / 512)),))
    # openai/consistency_models_cifar10:jcm/losses.py:704 ln σ = 1.2·n − 1.2
    r.eq("edm.p_mean", -1.2)
    # openai/consistency_models_cifar10:jcm/losses.py:704 P_std 1.2
    r.eq("edm.p_std", 1.2)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:21,57 heun, num_scales=18
    # (jcm/sampling.py:556-598: 17 Heun steps + a final Euler one, 35 NFE)
    r.eq("sample.edm_steps", 18)
    # openai/consistency_models_cifar10:configs/cifar10_k_ve.py:21 sampling.method="heun"
    r.eq("sample.edm_solver", "heun")
    # openai/consistency_models_cifar10:jcm/sampling.py:556-598 no clamp of the denoiser
    r.eq("sample.clip_denoised", False)
    r.done()


def check_cifar10_cm(r):
    """What CD and CT share on CIFAR-10."""
    check_cifar10_ncsnpp(r)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:69 dropout=0.0
    r.eq("model.dropout", 0.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:19 batch_size=512
    r.eq("train.batch_size", 512)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:74 optimizer="radam"
    r.eq("optim.name", "radam")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:76 beta1=0.9
    r.eq("optim.beta1", 0.9)
    # openai/consistency_models_cifar10:configs/default_cifar10_configs.py:65 beta2=0.999
    r.eq("optim.beta2", 0.999)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:77 eps=1e-8
    r.eq("optim.eps", 1e-8)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:73 weight_decay=0.0
    r.eq("optim.weight_decay", 0.0)
    # openai/consistency_models_cifar10:jcm/losses.py:72-82 the RAdam path has no warm-up
    r.eq("optim.warmup_steps", 0)
    # openai/consistency_models_cifar10:jcm/losses.py:72-82 ... and no clipping
    r.eq("optim.grad_clip", 0.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:46 ema_rate=0.9999
    r.eq("train.ema_rates", (0.9999,))
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:25 weighting="uniform"
    r.eq("loss.weighting", "uniform")
    # openai/consistency_models_cifar10:jcm/losses.py:311 i ~ randint(0, N − 1)
    r.eq("loss.index_sampling", "uniform")
    # openai/consistency_models_cifar10:jcm/losses.py:359-365 both images resized to 224
    r.eq("loss.lpips_resize", 224)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:35-36 and
    # cifar10_ve_ct_adaptive.py:40-41 method="onestep", std=t_max: one step from σ = 80
    r.eq("sample.steps", 1)
    # openai/consistency_models_cifar10:editing_multistep_sampling.ipynb cell 16
    # x0 = jnp.clip(x0, -1., 1.) at every step of the multistep sampler
    r.eq("sample.clip_denoised", True)


@pytest.mark.parametrize(
    "module, distance, lr",
    [
        ("cifar10_cd_l1", "l1", 2e-4),
        ("cifar10_cd_l2", "l2", 4e-4),
        ("cifar10_cd_lpips", "lpips", 4e-4),
    ],
)
def test_cifar10_cd(module, distance, lr):
    r = Recipe(module)
    check_cifar10_cm(r)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:12 training.loss="consistency"
    r.eq("method", "cd")
    # openai/consistency_models_cifar10:launch.sh:17,20,23 --config.training.loss_norm
    r.eq("loss.distance", distance)
    # openai/consistency_models_cifar10:launch.sh:17,20,23 --config.optim.lr 2e-4/4e-4/4e-4
    r.eq("optim.lr", lr)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:15 n_iters=800001
    r.eq("train.num_steps", 800_000)
    # openai/consistency_models_cifar10:jcm/losses.py:892-897 "consistency": no N/μ schedule
    r.eq("schedule.kind", "fixed")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:68 num_scales=18 (sde.N)
    r.eq("schedule.num_scales", 18)
    # openai/consistency_models_cifar10:jcm/losses.py:305-306,999-1004 target = params
    # (mutils.State has no target: θ⁻ = stop_gradient(θ), μ = 0)
    r.eq("schedule.target_ema", 0.0)
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:24 solver="heun"
    r.eq("teacher.solver", "heun")
    # openai/consistency_models_cifar10:configs/cifar10_ve_cd.py:21 finetune=True
    # (jcm/losses.py:137-142: θ ← teacher params, EMA ← teacher EMA)
    r.eq("teacher.init_student", True)
    if distance == "lpips":
        # openai/consistency_models_cifar10:jcm/models/lpips.py:23,82 flaxmodels VGG16 (max
        # pool) with the `lpips` linear heads, on (x+1)/2
        r.eq("loss.lpips_variant", "lpips")
        # openai/consistency_models_cifar10:editing_multistep_sampling.ipynb cells 17-18, 40:
        # ts=[0, 11, 17] on train_N=18; the ternary search's optimum p=11 (FID 2.928)
        r.eq("sample.two_step_ts", (0, 11, 17))
        # openai/consistency_models_cifar10:editing_multistep_sampling.ipynb cell 17 train_N=18
        r.eq("sample.num_scales", 18)
    r.done()


def test_cifar10_ct():
    r = Recipe("cifar10_ct")
    check_cifar10_cm(r)
    # openai/consistency_models_cifar10:configs/cifar10_ve_ct_adaptive.py:12
    # loss="consistency_adaptive", dsm_target=True (line 23): Euler step with x0
    r.eq("method", "ct")
    # openai/consistency_models_cifar10:launch.sh:52 --config.training.loss_norm='lpips'
    r.eq("loss.distance", "lpips")
    # openai/consistency_models_cifar10:jcm/models/lpips.py:23,82 flaxmodels VGG16, max pool
    r.eq("loss.lpips_variant", "lpips")
    # openai/consistency_models_cifar10:launch.sh:52 --config.optim.lr=0.0004
    # (the file says 2e-4: configs/cifar10_ve_ct_adaptive.py:80)
    r.eq("optim.lr", 4e-4)
    # openai/consistency_models_cifar10:configs/cifar10_ve_ct_adaptive.py:15 n_iters=800000
    r.eq("train.num_steps", 800_000)
    # openai/consistency_models_cifar10:configs/cifar10_ve_ct_adaptive.py:28-29
    # target_ema_mode="adaptive", scale_mode="progressive"
    r.eq("schedule.kind", "ct")
    # openai/consistency_models_cifar10:launch.sh:52 --config.training.start_scales=2
    r.eq("schedule.s0", 2)
    # openai/consistency_models_cifar10:launch.sh:52 --config.training.end_scales=150
    r.eq("schedule.s1", 150)
    # openai/consistency_models_cifar10:launch.sh:52 --config.training.start_ema=0.9
    r.eq("schedule.mu0", 0.9)
    # openai/consistency_models_cifar10:jcm/losses.py:916-927 μ = exp(s0·ln μ0 / n), N = n+1
    r.eq("schedule.mu_formula", "official")
    # openai/consistency_models_cifar10:jcm/losses.py:915 total_steps = n_iters = 800000
    r.value("curriculum K", curriculum_steps(r), 800_000)
    # openai/consistency_models_cifar10:configs/cifar10_ve_ct_adaptive.py:21 finetune=False
    # (CT from scratch; the ref model is loaded, losses.py:117-135, but never used)
    r.eq("teacher.init_student", False)
    r.done()


# ===========================================================================================
# ImageNet 64 (openai/consistency_models, PyTorch)
# ===========================================================================================


def check_in64_adm(r):
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --num_channels 192
    r.eq("model.name", "adm")
    r.eq("model.model_channels", 192)
    # openai/consistency_models:cm/script_util.py:129-130 channel_mult "" -> (1, 2, 3, 4) at 64
    r.eq("model.ch_mult", (1, 2, 3, 4))
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --num_res_blocks 3
    r.eq("model.num_res_blocks", 3)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --attention_resolutions 32,16,8
    r.eq("model.attn_resolutions", (32, 16, 8))
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --num_head_channels 64
    r.eq("model.num_head_channels", 64)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --use_scale_shift_norm True
    r.eq("model.use_scale_shift_norm", True)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --resblock_updown True
    r.eq("model.resblock_updown", True)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --class_cond True
    # (cm/script_util.py:7,149 NUM_CLASSES = 1000)
    r.eq("model.num_classes", 1000)
    # openai/consistency_models:cm/karras_diffusion.py:346 c_noise = 1000·0.25·ln(σ + 1e-44)
    r.eq("model.noise_scale", 1000.0)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --image_size 64
    r.eq("data.image_size", 64)
    # openai/consistency_models:cm/image_datasets.py:19 random_flip=True (cm_train.py:68-73)
    r.eq("data.random_flip", True)
    # openai/consistency_models:cm/script_util.py:31 sigma_min=0.002
    r.eq("karras.sigma_min", 0.002)
    # openai/consistency_models:cm/script_util.py:32 sigma_max=80.0
    r.eq("karras.sigma_max", 80.0)
    # openai/consistency_models:cm/karras_diffusion.py:40 rho=7.0
    r.eq("karras.rho", 7.0)
    # openai/consistency_models:cm/script_util.py:95 sigma_data=0.5
    r.eq("karras.sigma_data", 0.5)
    # openai/consistency_models:scripts/launch.sh:5,22,25,38 --ema_rate
    # 0.999,0.9999,0.9999432189950708
    r.eq("train.ema_rates", IN64_EMAS)
    check_pytorch_optimizer(r)


def check_pytorch_optimizer(r):
    # openai/consistency_models:cm/train_util.py:82-84 torch.optim.RAdam(lr, weight_decay)
    r.eq("optim.name", "radam")
    # openai/consistency_models:cm/train_util.py:82-84 torch RAdam default betas (0.9, 0.999)
    r.eq("optim.beta1", 0.9)
    r.eq("optim.beta2", 0.999)
    # openai/consistency_models:cm/train_util.py:82-84 torch RAdam default eps 1e-8
    r.eq("optim.eps", 1e-8)
    # openai/consistency_models:scripts/launch.sh:5-41 --weight_decay 0.0
    r.eq("optim.weight_decay", 0.0)
    # openai/consistency_models:cm/train_util.py:227-229 lr_anneal_steps 0: constant, no warm-up
    r.eq("optim.warmup_steps", 0)
    # openai/consistency_models:cm/fp16_util.py:183-230 no gradient clipping
    r.eq("optim.grad_clip", 0.0)


def check_cm_sampling(r, num_scales):
    # openai/consistency_models:scripts/launch.sh:48,51 --sampler onestep
    r.eq("sample.steps", 1)
    # openai/consistency_models:scripts/image_sample.py:123 clip_denoised=True
    # (cm/karras_diffusion.py:404-407 clamps x0 at every step, 419 the output)
    r.eq("sample.clip_denoised", True)
    # openai/consistency_models:scripts/launch.sh:74-92 --sampler multistep --steps (the grid)
    r.eq("sample.num_scales", num_scales)


def test_imagenet64_edm():
    r = Recipe("imagenet64_edm")
    check_in64_adm(r)
    # openai/consistency_models:scripts/launch.sh:5 edm_train.py
    r.eq("method", "edm")
    # openai/consistency_models:scripts/launch.sh:5 --dropout 0.1
    r.eq("model.dropout", 0.1)
    # openai/consistency_models:scripts/launch.sh:5 --global_batch_size 4096
    r.eq("train.batch_size", 4096)
    # openai/consistency_models:scripts/launch.sh:5 --lr 0.0001
    r.eq("optim.lr", 1e-4)
    # openai/consistency_models:scripts/launch.sh:5 --schedule_sampler lognormal
    # (cm/resample.py:161 p_mean=-1.2, p_std=1.2)
    r.eq("edm.p_mean", -1.2)
    r.eq("edm.p_std", 1.2)
    # openai/consistency_models:scripts/launch.sh:13 --sampler heun --steps 40 --s_churn 0
    r.eq("sample.edm_steps", 40)
    r.eq("sample.edm_solver", "heun")
    # openai/consistency_models:scripts/image_sample.py:123 clip_denoised=True
    # (cm/karras_diffusion.py:404-407: the Heun sampler's denoiser is clamped every step)
    r.eq("sample.clip_denoised", True)
    r.done()


def check_in64_cm(r):
    check_in64_adm(r)
    # openai/consistency_models:scripts/launch.sh:22,25,38 --dropout 0.0
    r.eq("model.dropout", 0.0)
    # openai/consistency_models:scripts/launch.sh:22,25,38 --global_batch_size 2048
    r.eq("train.batch_size", 2048)
    # openai/consistency_models:scripts/launch.sh:22,25,38 --weight_schedule uniform
    r.eq("loss.weighting", "uniform")
    # openai/consistency_models:cm/karras_diffusion.py:174-176 i ~ randint(0, N − 1)
    r.eq("loss.index_sampling", "uniform")
    # openai/consistency_models:cm/karras_diffusion.py:220-224 resized to 224 below 256
    r.eq("loss.lpips_resize", 224)


@pytest.mark.parametrize("variant, distance", [(None, "lpips"), ("l2", "l2")])
def test_imagenet64_cd(variant, distance):
    r = Recipe("imagenet64_cd", variant)
    check_in64_cm(r)
    # openai/consistency_models:scripts/launch.sh:22,25 --training_mode consistency_distillation
    r.eq("method", "cd")
    # openai/consistency_models:scripts/launch.sh:22 --loss_norm l2 / 25 --loss_norm lpips
    r.eq("loss.distance", distance)
    if distance == "lpips":
        # openai/consistency_models:cm/karras_diffusion.py:10,52
        # piq.LPIPS(replace_pooling=True): average pools
        r.eq("loss.lpips_variant", "piq")
    # openai/consistency_models:scripts/launch.sh:22,25 --lr 0.000008
    r.eq("optim.lr", 8e-6)
    # openai/consistency_models:scripts/launch.sh:22,25 --target_ema_mode fixed
    # --scale_mode fixed (cm/script_util.py:171-173)
    r.eq("schedule.kind", "fixed")
    # openai/consistency_models:scripts/launch.sh:22,25 --start_scales 40
    r.eq("schedule.num_scales", 40)
    # openai/consistency_models:scripts/launch.sh:22,25 --start_ema 0.95
    r.eq("schedule.target_ema", 0.95)
    # openai/consistency_models:scripts/launch.sh:22,25 --total_training_steps 600000
    # (the loop itself is unbounded: cm/train_util.py:361-365 with lr_anneal_steps 0)
    r.eq("train.num_steps", 600_000)
    # openai/consistency_models:cm/karras_diffusion.py:193-196 Heun step with the teacher
    r.eq("teacher.solver", "heun")
    # openai/consistency_models:scripts/cm_train.py:91-92 student ← teacher weights
    r.eq("teacher.init_student", True)
    # openai/consistency_models:scripts/launch.sh:74 (LPIPS), 77 (l2): --steps 40
    check_cm_sampling(r, 40)
    # openai/consistency_models:scripts/launch.sh:74 (LPIPS), 77 (l2): --ts 0,22,39
    r.eq("sample.two_step_ts", (0, 22, 39))
    r.done()


def check_in64_ct(r):
    check_in64_cm(r)
    # openai/consistency_models:scripts/launch.sh:38 --training_mode consistency_training
    r.eq("method", "ct")
    # openai/consistency_models:scripts/launch.sh:38 --loss_norm lpips
    r.eq("loss.distance", "lpips")
    # openai/consistency_models:cm/karras_diffusion.py:10,52 piq.LPIPS(replace_pooling=True)
    r.eq("loss.lpips_variant", "piq")
    # openai/consistency_models:scripts/launch.sh:38 --lr 0.0001
    r.eq("optim.lr", 1e-4)
    # openai/consistency_models:scripts/launch.sh:38 --target_ema_mode adaptive
    # --scale_mode progressive (cm/script_util.py:186-197)
    r.eq("schedule.kind", "ct")
    # openai/consistency_models:scripts/launch.sh:38 --start_scales 2
    r.eq("schedule.s0", 2)
    # openai/consistency_models:scripts/launch.sh:38 --end_scales 200
    r.eq("schedule.s1", 200)
    # openai/consistency_models:scripts/launch.sh:38 --start_ema 0.95
    r.eq("schedule.mu0", 0.95)
    # openai/consistency_models:cm/script_util.py:195-197 μ = exp(s0·ln μ0 / n), N = n + 1
    r.eq("schedule.mu_formula", "official")
    # openai/consistency_models:scripts/launch.sh:38 --total_training_steps 800000
    r.eq("train.num_steps", 800_000)
    # openai/consistency_models:cm/script_util.py:189 K = total_steps = 800000
    r.value("curriculum K", curriculum_steps(r), 800_000)
    # openai/consistency_models:scripts/launch.sh:80 --steps 201
    check_cm_sampling(r, 201)
    # openai/consistency_models:scripts/launch.sh:80 --ts 0,106,200
    r.eq("sample.two_step_ts", (0, 106, 200))


def test_imagenet64_ct():
    r = Recipe("imagenet64_ct")
    check_in64_ct(r)
    # openai/consistency_models:scripts/launch.sh:38 --teacher_model_path edm_imagenet64_ema.pt
    # (scripts/cm_train.py:91-92 copies the teacher into the student; issue #53)
    r.eq("teacher.init_student", True)
    r.done()


def test_imagenet64_ct_scratch():
    """The CM paper's CT from scratch: the official recipe without the teacher's weights."""
    r = load_variant("imagenet64_ct", "scratch")
    check_in64_ct(r)
    # CM paper (arXiv 2303.01469) Algorithm 3: CT with θ initialised at random
    r.eq("teacher.init_student", False)
    r.done()


# ===========================================================================================
# LSUN 256 bedroom and cat (openai/consistency_models, PyTorch)
# ===========================================================================================

CATEGORIES = ("bedroom", "cat")


def check_lsun_adm(r):
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --num_channels 256
    r.eq("model.name", "adm")
    r.eq("model.model_channels", 256)
    # openai/consistency_models:cm/script_util.py:125-126 channel_mult "" at 256
    # -> (1, 1, 2, 2, 4, 4)
    r.eq("model.ch_mult", (1, 1, 2, 2, 4, 4))
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --num_res_blocks 2
    r.eq("model.num_res_blocks", 2)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --attention_resolutions 32,16,8
    r.eq("model.attn_resolutions", (32, 16, 8))
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --num_head_channels 64
    r.eq("model.num_head_channels", 64)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --use_scale_shift_norm False
    r.eq("model.use_scale_shift_norm", False)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --resblock_updown True
    r.eq("model.resblock_updown", True)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --class_cond False
    r.eq("model.num_classes", 0)
    # openai/consistency_models:cm/karras_diffusion.py:346 c_noise = 1000·0.25·ln(σ + 1e-44)
    r.eq("model.noise_scale", 1000.0)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --image_size 256
    r.eq("data.image_size", 256)
    # openai/consistency_models:cm/image_datasets.py:19 random_flip=True
    r.eq("data.random_flip", True)
    # openai/consistency_models:scripts/launch.sh:28,31 --sigma_min 0.002 (script_util.py:31)
    r.eq("karras.sigma_min", 0.002)
    # openai/consistency_models:scripts/launch.sh:28,31 --sigma_max 80 (script_util.py:32)
    r.eq("karras.sigma_max", 80.0)
    # openai/consistency_models:cm/karras_diffusion.py:40 rho=7.0
    r.eq("karras.rho", 7.0)
    # openai/consistency_models:cm/script_util.py:95 sigma_data=0.5
    r.eq("karras.sigma_data", 0.5)
    # openai/consistency_models:scripts/launch.sh:7,28,31,41 --global_batch_size 256
    r.eq("train.batch_size", 256)
    check_pytorch_optimizer(r)


@pytest.mark.parametrize("category", CATEGORIES)
def test_lsun256_edm(category):
    r = Recipe("lsun256_edm", category)
    check_lsun_adm(r)
    # openai/consistency_models:scripts/launch.sh:7 train_imagenet_edm (EDM training)
    r.eq("method", "edm")
    # openai/consistency_models:scripts/launch.sh:7 --dropout 0.1
    r.eq("model.dropout", 0.1)
    # openai/consistency_models:scripts/launch.sh:7 --lr 0.0001
    r.eq("optim.lr", 1e-4)
    # openai/consistency_models:scripts/launch.sh:7 --ema_rate 0.999,0.9999,0.9999432189950708
    # (the LSUN teacher's; the LSUN CD/CT runs use 0.9999,0.99994,...)
    r.eq("train.ema_rates", IN64_EMAS)
    # openai/consistency_models:scripts/launch.sh:7 --schedule_sampler lognormal
    # (cm/resample.py:161 p_mean=-1.2, p_std=1.2)
    r.eq("edm.p_mean", -1.2)
    r.eq("edm.p_std", 1.2)
    # openai/consistency_models:scripts/launch.sh:15 --sampler heun --steps 40 --s_churn 0
    r.eq("sample.edm_steps", 40)
    r.eq("sample.edm_solver", "heun")
    # openai/consistency_models:scripts/image_sample.py:123 clip_denoised=True
    # (cm/karras_diffusion.py:404-407: the Heun sampler's denoiser is clamped every step)
    r.eq("sample.clip_denoised", True)
    r.done()


def check_lsun_cm(r):
    check_lsun_adm(r)
    # openai/consistency_models:scripts/launch.sh:28,31,41 --dropout 0.0
    r.eq("model.dropout", 0.0)
    # openai/consistency_models:scripts/launch.sh:28,31,41 --ema_rate
    # 0.9999,0.99994,0.9999432189950708
    r.eq("train.ema_rates", LSUN_EMAS)
    # openai/consistency_models:scripts/launch.sh:28,31,41 --weight_schedule uniform
    r.eq("loss.weighting", "uniform")
    # openai/consistency_models:cm/karras_diffusion.py:174-176 i ~ randint(0, N − 1)
    r.eq("loss.index_sampling", "uniform")
    # openai/consistency_models:cm/karras_diffusion.py:220 no resize at 256 (only below 256)
    r.eq("loss.lpips_resize", 224)


# Two-step ts of the released LSUN CD models: scripts/launch.sh:83 (bedroom LPIPS), 86 (bedroom
# l2); launch.sh has no two-step line for the cat CD models.
LSUN_CD_TS = {("bedroom", ""): (0, 17, 39), ("bedroom", "l2"): (0, 18, 39)}


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("metric", ["", "l2"])
def test_lsun256_cd(category, metric):
    r = Recipe("lsun256_cd", f"{category}_{metric}" if metric else category)
    check_lsun_cm(r)
    # openai/consistency_models:scripts/launch.sh:28,31 consistency_distillation
    r.eq("method", "cd")
    # openai/consistency_models:scripts/launch.sh:28 --loss_norm l2 / 31 --loss_norm lpips
    r.eq("loss.distance", metric or "lpips")
    if not metric:
        # openai/consistency_models:cm/karras_diffusion.py:10,52 piq.LPIPS(replace_pooling=True)
        r.eq("loss.lpips_variant", "piq")
    # openai/consistency_models:scripts/launch.sh:28,31 --lr 0.00001
    r.eq("optim.lr", 1e-5)
    # openai/consistency_models:scripts/launch.sh:28,31 --target_ema_mode fixed --scale_mode fixed
    r.eq("schedule.kind", "fixed")
    # openai/consistency_models:scripts/launch.sh:28,31 --start_scales 40
    r.eq("schedule.num_scales", 40)
    # openai/consistency_models:scripts/launch.sh:28,31 --start_ema 0.95
    r.eq("schedule.target_ema", 0.95)
    # openai/consistency_models:scripts/launch.sh:28,31 --total_training_steps 600000
    r.eq("train.num_steps", 600_000)
    # openai/consistency_models:cm/karras_diffusion.py:193-196 Heun step with the teacher
    r.eq("teacher.solver", "heun")
    # openai/consistency_models:scripts/launch.sh:28,31 --teacher_model_path
    # (scripts/cm_train.py:91-92 copies the teacher into the student)
    r.eq("teacher.init_student", True)
    # openai/consistency_models:scripts/launch.sh:83,86 --steps 40
    check_cm_sampling(r, 40)
    if (category, metric) in LSUN_CD_TS:
        # openai/consistency_models:scripts/launch.sh:83 --ts 0,17,39 (cd_bedroom256_lpips),
        # 86 --ts 0,18,39 (cd_bedroom256_l2); no line for the cat CD models
        r.eq("sample.two_step_ts", LSUN_CD_TS[category, metric])
    r.done()


LSUN_CT_TS = {"bedroom": (0, 67, 150), "cat": (0, 62, 150)}  # scripts/launch.sh:89, 92


def check_lsun_ct(r, category):
    check_lsun_cm(r)
    # openai/consistency_models:scripts/launch.sh:41 --training_mode consistency_training
    r.eq("method", "ct")
    # openai/consistency_models:scripts/launch.sh:41 --loss_norm lpips
    r.eq("loss.distance", "lpips")
    # openai/consistency_models:cm/karras_diffusion.py:10,52 piq.LPIPS(replace_pooling=True)
    r.eq("loss.lpips_variant", "piq")
    # openai/consistency_models:scripts/launch.sh:41 --lr 0.00005
    r.eq("optim.lr", 5e-5)
    # openai/consistency_models:scripts/launch.sh:41 --target_ema_mode adaptive
    # --scale_mode progressive
    r.eq("schedule.kind", "ct")
    # openai/consistency_models:scripts/launch.sh:41 --start_scales 2
    r.eq("schedule.s0", 2)
    # openai/consistency_models:scripts/launch.sh:41 --end_scales 150
    r.eq("schedule.s1", 150)
    # openai/consistency_models:scripts/launch.sh:41 --start_ema 0.95
    r.eq("schedule.mu0", 0.95)
    # openai/consistency_models:cm/script_util.py:195-197 μ = exp(s0·ln μ0 / n), N = n + 1
    r.eq("schedule.mu_formula", "official")
    # openai/consistency_models:scripts/launch.sh:41 --total_training_steps 1000000
    r.eq("train.num_steps", 1_000_000)
    r.value("curriculum K", curriculum_steps(r), 1_000_000)
    # openai/consistency_models:scripts/launch.sh:89 (bedroom), 92 (cat) --steps 151
    check_cm_sampling(r, 151)
    # openai/consistency_models:scripts/launch.sh:89 --ts 0,67,150 (ct_bedroom256),
    # 92 --ts 0,62,150 (ct_cat256)
    r.eq("sample.two_step_ts", LSUN_CT_TS[category])


@pytest.mark.parametrize("category", CATEGORIES)
def test_lsun256_ct(category):
    r = Recipe("lsun256_ct", category)
    check_lsun_ct(r, category)
    # openai/consistency_models:scripts/launch.sh:41 --teacher_model_path edm_bedroom256_ema.pt
    # (scripts/cm_train.py:91-92 copies the teacher into the student; issue #53)
    r.eq("teacher.init_student", True)
    r.done()


@pytest.mark.parametrize("category", CATEGORIES)
def test_lsun256_ct_scratch(category):
    """CT from scratch, as the CM paper describes it (the variant name follows `bedroom_l2`)."""
    r = load_variant("lsun256_ct", f"{category}_scratch")
    check_lsun_ct(r, category)
    # CM paper (arXiv 2303.01469) Algorithm 3: CT with θ initialised at random
    r.eq("teacher.init_student", False)
    r.done()


# ===========================================================================================
# The successors' two-step time points on CIFAR-10 (one step is always σ_max = 80)
# ===========================================================================================


def test_ect_two_step():
    r = Recipe("cifar10_ect")
    # locuslab/ect:ct_train.py:99 and ct_eval.py:94 --mid_t default [0.821];
    # training/ct_training_loop.py:80-97 t_steps = [t_max=80] + mid_t, x ← f(x,t) + t_next·z
    r.eq("sample.two_step_sigmas", (80.0, 0.821))
    r.done()


def test_ict_two_step():
    r = Recipe("cifar10_ict")
    # iCT (arXiv 2310.14189): σ = 0.821 for CIFAR-10 two-step, as recalled (not verified in
    # the paper's text here); locuslab/ect:ct_train.py:99 uses the same default mid_t 0.821
    r.eq("sample.two_step_sigmas", (80.0, 0.821))
    r.done()


@pytest.mark.parametrize("module", ["cifar10_sct", "cifar10_scd"])
def test_scm_two_step(module):
    r = Recipe(module)
    # sCM arXiv 2410.11081v2 App. G.2: t_max = arctan(80/σ_d); "For 2-step sampling, we use
    # the algorithm in Song et al. (2023) with an intermediate t = 1.1": σ = 0.5·tan(1.1)
    r.eq("sample.two_step_sigmas", (80.0, 0.5 * math.tan(1.1)))
    r.done()
