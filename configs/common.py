"""Defaults shared by every config: each experiment file starts from `base_config()` and
changes what its paper changes. Every field can be overridden as --config.a.b=value."""

import ml_collections


def ncsnpp_cifar10():
    """NCSN++ exactly as in the official CM CIFAR-10 configs (about 56M parameters)."""
    return ml_collections.ConfigDict(
        dict(
            name="ncsnpp",
            nf=128,
            ch_mult=(2, 2, 2),
            num_res_blocks=4,
            attn_resolutions=(16,),
            dropout=0.0,
            resblock_type="biggan",
            fir=True,
            fir_kernel=(1, 3, 3, 1),
            skip_rescale=True,
            resamp_with_conv=True,
            progressive="none",
            progressive_input="residual",
            progressive_combine="sum",
            embedding_type="fourier",
            fourier_scale=16.0,
            # sCM (Lu & Song 2025, §4.1): the noise input c_noise is log_sigma (EDM's ¼·ln σ) or
            # trigflow_t (t = arctan(σ/σ_d)); norm is group or adaptive_double (residual blocks'
            # y = norm(x)·pnorm(s(t)) + pnorm(b(t))). models/ncsnpp.py: what the paper leaves open.
            noise_conditioning="log_sigma",
            norm="group",
            init_scale=0.0,
            num_classes=0,
            dtype="float32",
            # Overridable with a string ("cudnn" on GPUs); None = the default XLA attention.
            attention_impl=ml_collections.config_dict.placeholder(str),
        )
    )


def tiny_ncsnpp(nf=16):
    """A small NCSN++ (under 1M parameters) with every component of the real one, for CPUs."""
    model = ncsnpp_cifar10()
    model.update(nf=nf, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    return model


def adm_imagenet64():
    """ADM (guided-diffusion's U-Net) as openai/consistency_models trains it on ImageNet 64:
    192 channels, 3 blocks per level, attention at 32, 16 and 8 with 64-channel heads,
    scale-shift norm, residual up/down-sampling, class-conditional (295,899,267 parameters)."""
    return ml_collections.ConfigDict(
        dict(
            name="adm",
            model_channels=192,
            ch_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attn_resolutions=(32, 16, 8),
            num_head_channels=64,
            num_heads=4,
            use_scale_shift_norm=True,
            resblock_updown=True,
            conv_resample=True,
            dropout=0.0,
            num_classes=1000,
            noise_scale=1000.0,
            dtype="float32",
            attention_impl=ml_collections.config_dict.placeholder(str),
        )
    )


def adm_lsun256():
    """ADM as openai/consistency_models trains it on LSUN 256 (bedroom, cat): 256 channels,
    ch_mult (1, 1, 2, 2, 4, 4), 2 blocks per level, attention at 32, 16 and 8 with 64-channel
    heads, residual up/down-sampling, no scale-shift norm, unconditional."""
    model = adm_imagenet64()
    model.update(
        model_channels=256,
        ch_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        use_scale_shift_norm=False,
        num_classes=0,
    )
    return model


def tiny_adm():
    """A small class-conditional ADM (under 1M parameters) with every component of the real
    one, for CPUs: 10 classes, so CIFAR-10's labels stand in for ImageNet's."""
    model = adm_imagenet64()
    model.update(
        model_channels=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_head_channels=32,
        num_classes=10,
    )
    return model


def base_config():
    c = ml_collections.ConfigDict()
    # "ct" (CT and iCT; the schedule/loss fields pick the recipe), "cd" (distillation from an
    # EDM teacher), "edm" (the diffusion teacher itself), "pd" (progressive distillation of an
    # EDM teacher, the CM paper's baseline), "ect" (easy consistency training) or "sct" and
    # "scd" (sCM's continuous-time consistency training and distillation).
    c.method = "ct"

    c.data = dict(
        dataset="cifar10",
        dir="",  # npz shards (images uint8 NHWC, labels) or image files; "" = tfds.
        split="train",
        image_size=32,
        num_channels=3,
        random_flip=True,
        seed=0,
        tfds_data_dir="",
        prefetch=2,  # Batches prepared ahead on the host.
        num_workers=4,  # ArrayRecord data: decode threads per process.
        verify_checksums=False,  # ArrayRecord data: sha256 every shard before training.
    )
    c.model = ncsnpp_cifar10()
    c.karras = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5)
    c.loss = dict(
        distance="l2",  # l2 | l1 | pseudo_huber | lpips
        huber_c=-1.0,  # pseudo_huber's c; < 0: iCT's 0.00054·√d
        lpips_vgg_path="",  # LPIPS: torchvision vgg16 state dict (.pth) or converted npz
        lpips_resize=224,  # LPIPS: images smaller than this are resized up to it
        # LPIPS network: lpips (the lpips package, max pools: the official JAX CIFAR-10 code) |
        # piq (piq.LPIPS(replace_pooling=True), average pools: the official PyTorch code)
        lpips_variant="lpips",
        weighting="uniform",  # uniform | ict (1/Δσ) | snr | snrp1 | truncated_snr
        index_sampling="uniform",  # uniform | lognormal (iCT)
        p_mean=-1.1,  # lognormal pair sampling (iCT), ECT's t and sCM's σ
        p_std=2.0,
    )
    c.schedule = dict(
        kind="ct",  # ct (original CT) | ict (exponential, μ = 0) | fixed | pd (PD)
        s0=2,
        s1=150,
        mu0=0.9,
        mu_formula="official",  # μ(k) = exp(s0·ln μ0 / (N−1)) as the official code; "paper": / N
        total_steps=0,  # K of the curriculum; 0 = train.num_steps
        num_scales=18,  # kind="fixed"
        target_ema=0.0,  # kind="fixed"
        pd_start_scales=4096,  # kind="pd": the first student's steps (halved every stage)
        pd_stage_steps=50_000,  # kind="pd": K, the steps of one stage (2K for N = 2 and 1)
    )
    c.optim = dict(
        name="radam",
        lr=4e-4,
        warmup_steps=0,
        grad_clip=0.0,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
    )
    c.edm = dict(p_mean=-1.2, p_std=1.2)
    # method="ect": the gap t − r of easy consistency training (schedules.ect_r); t is drawn
    # lognormally with loss.p_mean and loss.p_std.
    c.ect = dict(
        mapping="sigmoid",  # Δt/t = q^{−(s+1)}·n(t): n = 1 + k·sigmoid(−b·t) | const: n = 1
        q=2.0,  # Δt shrinks by q every stage
        k=8.0,
        b=1.0,
        stage_steps=25_000,  # optimizer steps per stage
        boundary_in_training=False,  # True: train with the σ_min-offset scalings too
    )
    # method="sct"/"scd" (losses.continuous_consistency_loss, trigflow.py).
    c.scm = dict(
        tangent_warmup_steps=10_000,  # r = min(1, k/this) on the tangent's second term
        tangent_norm_c=0.1,  # g ← g/(‖g‖ + c)
        tangent_norm="rms",  # rms (‖g‖/√dim, NVlabs/FastGen) | l2 (the paper's ‖g‖)
        prior_weighting=True,  # w(t) = 1/σ; False: 1
        uncertainty_channels=128,  # Fourier features of the adaptive weight u_φ(σ)
        jvp="autodiff",  # dF⁻/dt by jax.jvp | finite_difference (cuDNN attention)
        jvp_eps=0.0,  # finite_difference: the step relative to t; 0 = by dtype
        # (1e-3 in float32, 0.05 in bfloat16)
    )
    c.teacher = dict(
        workdir="",  # cd, pd, ect, scd (sct: optional start): a method="edm" run's
        # --workdir (or checkpoints/<step>)
        ema_rate=0.0,  # which of its EMAs; 0 = its first
        step=0,  # which checkpoint; 0 = the newest
        solver="heun",  # CD: the teacher's ODE step, heun (CM) | euler
        # CD, CT, ECT, sCM: start θ from the teacher's weights (the official runs; CIFAR-10 CT
        # and the small variants train from scratch); PD always does
        init_student=True,
    )
    # --mode=sample (launch.py): which checkpoint and EMA, and the time points.
    c.sample = dict(
        num_samples=64,
        batch_size=256,
        # Consistency models: steps=1 is the recipe's one-step setting (σ_max), 2 its two-step
        # one (two_step_sigmas, or two_step_ts on num_scales). sigmas or ts, when set, win.
        steps=1,
        two_step_sigmas=(),  # e.g. iCT's (80.0, 0.821)
        two_step_ts=(),  # or official indices into num_scales, e.g. (0, 22, 39) of 40
        sigmas=(),  # Decreasing σ's of CM Algorithm 1, e.g. (80.0, 0.821)
        ts=(),  # Or the official indices into a num_scales grid, e.g. (0, 22, 39)
        num_scales=0,
        edm_steps=18,  # EDM teacher runs: Heun/Euler steps (also the sample grids)
        edm_solver="heun",
        # Clip every denoised image to [-1, 1] (consistency models always did; EDM: the official
        # PyTorch sampler does, the JAX CIFAR-10 one does not).
        clip_denoised=True,
        pd_steps=0,  # PD runs: Euler steps; 0 = the steps the student learned
        seed=0,
        ema_rate=0.0,  # 0 = the run's first evaluation EMA
        checkpoint_step=0,  # 0 = the newest checkpoint
        out_dir="",  # "" = workdir/samples
    )
    # --mode=edit: zero-shot editing (cm_jax/editing.py) of user images.
    c.edit = dict(
        # task: inpainting | colorization | superres | stroke | interpolation | denoising
        task="inpainting",
        images="",  # npz (images or arr_0, uint8 NHWC) or PNG files (glob or a,b,c)
        sigmas=(80.0, 10.0, 2.0, 0.5),  # stroke: the first is σ at which the guide is noised
        mask="center",  # inpainting: center | left_half
        mask_png="",  # inpainting: a mask image instead (white = known)
        factor=2,  # superres: patch size
        num_frames=8,  # interpolation: frames per pair
        num_pairs=4,  # interpolation: pairs of random latents
        seed=0,
        ema_rate=0.0,
        checkpoint_step=0,
        out_dir="",  # "" = workdir/edits
    )
    # --mode=stats and --mode=eval (cm_jax/evaluation): FID / sFID with the TF-Inception network.
    c.eval = dict(
        ref_stats="",  # eval: reference statistics npz (e.g. from --mode=stats)
        ref_stats_out="",  # stats: where to write; "" = workdir/eval/ref_<dataset>_<split>.npz
        samples_npz="",  # eval: score these images (arr_0 or images) instead of sampling
        num_samples=50_000,  # eval: samples from the run (time points from config.sample)
        batch_size=250,  # Inception batch, split over the devices
        chunk_size=0,  # eval: samples per saved progress step; 0 = 10 batches
        inception_path="",  # converted weights; "" = ~/.cache/cm_jax/tf_inception_fid.npz
        classifier_path="",  # Inception Score: pytorch-fid's pt_inception-2015-12-05 .pth
        # (or its converted npz); "" = IS reported as unavailable
        ref_features_max=50_000,  # stats: also keep the pool3 features of up to this many
        # reference images (precision/recall in eval); 0 = none
    )
    # --mode=search: the two-step middle time point that minimises FID (against eval.ref_stats).
    c.search = dict(
        kind="index",  # index: ts = (0, m, N−1) on num_scales | sigma: (σ_max, σ)
        num_scales=18,  # index: the grid size (18 for CIFAR-10 CD, 40 for ImageNet 64)
        sigma_lo=0.05,  # sigma: the bracket for σ, searched in ln σ
        sigma_hi=10.0,
        iterations=8,  # sigma: rounds of ternary search
        num_samples=10_000,  # samples per FID
    )
    c.train = dict(
        batch_size=512,
        num_steps=800_000,
        steps_per_call=1,  # > 1: lax.scan several steps per device call
        microbatches=1,  # > 1: accumulate the gradient over this many slices of the batch
        log_every=100,
        save_every=10_000,
        keep_checkpoints=3,
        sample_every=10_000,  # 0 disables the sample grids
        num_sample_images=64,
        sample_seed=42,
        ema_rates=(0.9999,),  # evaluation EMAs; samples use the first
        seed=42,
        fid_every=0,  # > 0: FID of the first EMA every so many steps (needs eval.ref_stats)
        fid_num_samples=10_000,
        # TensorBoard events in workdir/tensorboard/ (needs TensorFlow, whose import takes ~7 s
        # on a CPU host); False keeps metrics.jsonl and the console only.
        tensorboard=True,
        # A step whose loss or gradients are not finite: stop (an error naming the step and the
        # newest good checkpoint; nothing non-finite is ever saved) | skip (drop that update).
        nonfinite="stop",
        allow_config_change=False,  # Resume although the math-relevant config changed.
    )
    # Where the state lives: a ("data", "fsdp") device mesh. fsdp > 1 splits θ, the optimizer
    # state, θ⁻, the EMAs and the frozen teacher/LPIPS weights over that many devices (fully
    # sharded data parallelism); data = device count / fsdp. The math is the same for every
    # fsdp, and a checkpoint resumes with any (README "Sharding").
    c.mesh = dict(fsdp=1)
    return c


def apply_cpu_variant(c, num_steps=600):
    """Shrink a paper config so it trains for real on a 2-core CPU in about five minutes
    (a 0.32M-parameter NCSN++ at batch 32: about 0.5 s per step there)."""
    c.model = tiny_ncsnpp(nf=16)
    c.train.update(
        batch_size=32,
        num_steps=num_steps,
        log_every=25,
        save_every=200,
        sample_every=200,
        num_sample_images=64,
        ema_rates=(0.995,),
    )
    return c


def apply_test_variant(c):
    """The smallest run that exercises every code path of the methods, trainer, checkpoints and
    samplers: for the test suite. Its NCSN++ has one resolution, with attention: a second one
    (down- and up-sampling, tested in test_ncsnpp.py) made a train step trace and compile in
    17 s instead of 9 (8 CPU devices)."""
    c.model = tiny_ncsnpp(nf=8)
    c.model.update(ch_mult=(1,), attn_resolutions=(16,))
    c.data.image_size = 16
    c.train.update(
        batch_size=8,
        num_steps=4,
        log_every=2,
        save_every=2,
        sample_every=4,
        num_sample_images=4,
        ema_rates=(0.9, 0.99),
    )
    return c


def cd_config(distance, lr, variant):
    """Consistency distillation on CIFAR-10 as the CM paper and the official `cifar10_ve_cd`
    config: batch 512, RAdam (no warm-up, no clipping), N = 18 fixed, μ = 0 (θ⁻ = sg(θ)),
    uniform weighting, dropout 0, 800k steps, eval EMA 0.9999, Heun teacher steps, the student
    initialised from the teacher. The teacher is a `cifar10_edm.py` run: --config.teacher.workdir.
    """
    c = base_config()
    c.method = "cd"
    c.loss.update(distance=distance, weighting="uniform", index_sampling="uniform")
    c.schedule.update(kind="fixed", num_scales=18, target_ema=0.0)
    c.optim.update(name="radam", lr=lr)
    c.train.update(batch_size=512, num_steps=800_000, ema_rates=(0.9999,))
    c.teacher.update(solver="heun", init_student=True)
    if variant == "cpu":
        apply_cpu_variant(c)
    elif variant == "test":
        apply_test_variant(c)
    elif variant:
        raise ValueError(f"Unknown variant {variant!r}: use cpu or test.")
    if variant and distance == "lpips":
        c.loss.distance = "l2"  # LPIPS needs the VGG16 backbone file; small variants use l2.
    return c


def ema_rate_for_half_life(half_life_images, batch_size):
    """The per-step EMA rate r whose weights halve every half_life_images: r^(h/B) = ½."""
    return 0.5 ** (batch_size / half_life_images)


def apply_scm_network(model):
    """sCM's changes to the CIFAR-10 network (Lu & Song 2025, §4.1 and App. G.1): positional
    time embeddings, c_noise(t) = t and adaptive double normalisation. The paper's DDPM++ layout
    (no FIR, no input pyramid) is not copied: NCSN++ stays, as in every CIFAR-10 recipe here."""
    model.update(
        embedding_type="positional", noise_conditioning="trigflow_t", norm="adaptive_double"
    )
    return model


# sCM's two-step sampling point t = 1.1 (Lu & Song 2025), as EDM's σ = σ_d·tan(1.1).
SCM_TWO_STEP_SIGMAS = (80.0, 0.5 * 1.9647596572486523)


def scm_config(method, variant):
    """sCM on CIFAR-10 (Lu & Song, ICLR 2025): sCT (method "sct") or sCD ("scd"), in TrigFlow
    coordinates on the EDM-preconditioned NCSN++. As in the paper ("For both sCT and sCD, we
    initialize from the teacher diffusion model"), both start from the EMA weights of a
    diffusion teacher, a `cifar10_edm.py:scm` run (the paper's teacher has positional time
    embeddings; so does the student).

    From the paper (App. G, arXiv v2): RAdam with lr 1e-4, β = (0.9, 0.99), ε = 1e-8 and no
    schedule; batch 512, the teacher's; EMA half-life 0.5M images; dropout 0.20 for sCT and 0 for
    sCD; ln σ ~ N(−1.0, 1.4²); tangent normalisation constant 0.1 and warm-up over 10k steps;
    two-step sampling through t = 1.1. From NVlabs/FastGen's `config_scm.py`: the rms tangent
    norm (the paper's is ‖g‖: `scm.tangent_norm=l2`), prior weight 1/σ, no warm-up or clipping.
    The paper does not state the CIFAR-10 run's length: 400k steps here, its teacher's and its
    ImageNet-64 sCT's.

    `:cpu` and `:test` sCT train from scratch (no teacher to train first); `:cpu` sCD distils a
    `cifar10_edm.py:cpu` teacher, whose network has Fourier embeddings.
    """
    c = base_config()
    c.method = method
    c.teacher.init_student = True
    c.loss.update(p_mean=-1.0, p_std=1.4)
    c.optim.update(name="radam", lr=1e-4, beta1=0.9, beta2=0.99, warmup_steps=0, grad_clip=0.0)
    c.train.update(
        batch_size=512, num_steps=400_000, ema_rates=(ema_rate_for_half_life(500_000, 512),)
    )
    c.sample.two_step_sigmas = SCM_TWO_STEP_SIGMAS
    if variant == "cpu":
        apply_cpu_variant(c)  # sCD: the network of a cifar10_edm.py:cpu teacher.
        c.scm.tangent_warmup_steps = 100
        c.optim.lr = 2e-4
    elif variant == "test":
        apply_test_variant(c)
        c.scm.tangent_warmup_steps = 2
    elif variant:
        raise ValueError(f"Unknown variant {variant!r}: use cpu or test.")
    if method == "sct" and variant:
        c.teacher.init_student = False  # From scratch.
    if method == "sct" or not variant:
        c.model.embedding_type = "positional"
    if not variant:  # The paper's network, as its teacher's (cifar10_edm.py:scm).
        apply_scm_network(c.model)
    c.model.dropout = 0.2 if method == "sct" else 0.0
    return c


# ImageNet 64 (openai/consistency_models `scripts/launch.sh`)
IMAGENET64_EMA_RATES = (0.999, 0.9999, 0.9999432189950708)


def imagenet64_config(method):
    """The ImageNet-64 settings every recipe shares: the class-conditional ADM, 64×64 images
    with random flips, σ ∈ [0.002, 80], and the three evaluation EMAs of the official runs.
    The data: 1.28M images as npz shards in `data.dir` (about 16 GB as uint8; e.g. guided-
    diffusion's 64×64 downsampling of ImageNet), or tfds `imagenet_resized/64x64`."""
    c = base_config()
    c.method = method
    c.model = adm_imagenet64()
    c.data.update(dataset="imagenet_resized/64x64", image_size=64, random_flip=True)
    c.loss.lpips_variant = "piq"  # piq.LPIPS(replace_pooling=True), as cm/karras_diffusion.py
    c.train.update(ema_rates=IMAGENET64_EMA_RATES, num_sample_images=64)
    return c


# LSUN 256 (openai/consistency_models `scripts/launch.sh`)
LSUN256_EMA_RATES = (0.9999, 0.99994, 0.9999432189950708)
LSUN_CATEGORIES = ("bedroom", "cat")


def split_lsun_variant(variant, name, metrics=("",)):
    """(category, metric, small variant or None) of an LSUN config's variant: `bedroom` (the
    default) or `cat`, with `_<metric>` for the metrics given, or the small `cpu` / `test`."""
    if variant in ("cpu", "test"):
        return "bedroom", "", variant
    category, _, metric = (variant or "bedroom").partition("_")
    if category not in LSUN_CATEGORIES or metric not in metrics:
        options = [f"{c}_{m}" if m else c for c in LSUN_CATEGORIES for m in metrics]
        raise ValueError(
            f"Unknown variant {variant!r} of {name}: use {', '.join(options)}, cpu or test."
        )
    return category, metric, None


def apply_adm_teacher_recipe(c, small):
    """openai/consistency_models' EDM teacher on ADM: dropout 0.1, RAdam 1e-4 at a constant
    rate, lognormal σ (P_mean −1.2, P_std 1.2) with the EDM weighting, Heun with 40 steps for
    the grids, 600k steps; the small variants train faster and sample with fewer steps. Call
    after the small variant's network is in place."""
    if not small:  # The small variants keep their own network (no dropout) and length.
        c.model.dropout = 0.1
        c.train.num_steps = 600_000
    c.optim.update(name="radam", lr=1e-3 if small == "cpu" else 1e-4, warmup_steps=0, grad_clip=0.0)
    steps = {"cpu": 18, "test": 3}.get(small, 40)
    c.edm.update(p_mean=-1.2, p_std=1.2)
    c.sample.update(edm_steps=steps, clip_denoised=True)  # scripts/image_sample.py's default
    return c


def lsun256_config(method, category):
    """The LSUN-256 settings every recipe shares: the unconditional ADM at 256×256 with random
    flips, σ ∈ [0.002, 80], batch 256, and the official runs' three evaluation EMAs. The data:
    256×256 centre crops of one LSUN category (guided-diffusion's `datasets/lsun_bedroom.py`
    makes them) as npz shards or an image folder in `data.dir`; tfds `lsun/<category>` holds
    the original sizes, which the loader refuses. `category` comes from `split_lsun_variant`."""
    c = base_config()
    c.method = method
    c.model = adm_lsun256()
    c.data.update(dataset=f"lsun/{category}", image_size=256, random_flip=True)
    c.loss.lpips_variant = "piq"  # piq.LPIPS(replace_pooling=True), as cm/karras_diffusion.py
    c.train.update(batch_size=256, ema_rates=LSUN256_EMA_RATES, num_sample_images=16)
    return c


def apply_small_lsun_variant(c, variant, name):
    """`cpu` and `test` as `apply_small_adm_variant`, with the tiny ADM made unconditional and
    without scale-shift norm, as the LSUN network is."""
    apply_small_adm_variant(c, variant, name)
    if variant in ("cpu", "test"):
        c.model.update(num_classes=0, use_scale_shift_norm=False)
    return c


def apply_small_adm_variant(c, variant, name):
    """`cpu`: a tiny ADM trained for real on the local CIFAR-10 (32×32, its 10 labels standing
    in for ImageNet's classes), 300 steps (ADM's full-resolution first level makes a step about
    1.2 s there, three times the tiny NCSN++'s); `test`: the smallest run, for the test suite."""
    if variant == "cpu":
        apply_cpu_variant(c, num_steps=300)
        c.train.update(save_every=100, sample_every=100)
        c.data.update(dataset="cifar10", image_size=32)
        c.model = tiny_adm()
        c.model.attn_resolutions = (16,)  # The 32×32 images' second level.
    elif variant == "test":
        apply_test_variant(c)
        c.model = tiny_adm()
        # One resolution, as the test NCSN++ (test_adm.py tests the resampling blocks): a train
        # step traced and compiled in 9 s instead of 14.
        c.model.update(ch_mult=(1,), attn_resolutions=(16,))
    elif variant:
        raise ValueError(f"Unknown variant {variant!r} of {name}: use cpu or test.")
    return c
