"""Training curricula and noise-level sampling of consistency training.

- N(k): the number of grid points at training step k (original CT, iCT, fixed), or of
  sampling steps of a progressive-distillation student (PD).
- μ(k): the decay of the target network θ⁻ ← μ·θ⁻ + (1−μ)·θ (CM Algorithm 3).
- PD's stages: when a new stage starts (the student becomes the teacher) and the
  learning-rate factor within a stage.
- ECT's continuous-time gap: the target's noise level r for a student at t, shrinking by
  stages.
- Which adjacent pair (σ_i, σ_{i+1}) of the grid a training example uses, and its weight λ.

All functions are jit-safe in the step k and in N (integers may be traced), because N changes
during training and recompiling for every value would be wasteful. The grid is ascending
(see karras.py): the student sits at σ_{i+1}, the target at σ_i.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from cm_jax import karras


# --------------------------------------------------------------------------- N(k) and μ(k)
def ct_num_scales(k, total_steps, s0=2, s1=150):
    """Original CT curriculum (CM Appendix C): N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1.

    With s0=2, s1=150, K=800k this gives 2 at k=0, 76 at 200k, 107 at 400k, 151 at 800k.
    The official code also clamps the inner term at ≥ 1, which only matters for s0 < 2.
    """
    frac = jnp.asarray(k, jnp.float32) / total_steps
    inner = jnp.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2)
    n = jnp.maximum(jnp.ceil(inner - 1.0), 1.0)
    return n.astype(jnp.int32) + 1


def ct_target_ema(num_scales, s0=2, mu0=0.9, formula="paper"):
    """Original CT target decay μ(k) = exp(s0·ln μ0 / N(k)).

    formula="paper": divide by N(k), as printed in the CM paper (μ = μ0 at k = 0 with s0 = 2).
    formula="official": divide by N(k) − 1, as the official code (consistency_models_cifar10
    `losses.get_ema_scales_fn` and openai/consistency_models `create_ema_and_scales_fn`) does;
    μ at k = 0 is then μ0^{s0/(s0−1)} = 0.81 for μ0 = 0.9.
    """
    n = jnp.asarray(num_scales, jnp.float32)
    if formula == "paper":
        denominator = n
    elif formula == "official":
        denominator = n - 1.0
    else:
        raise ValueError(f"Unknown μ(k) formula {formula!r}: use 'paper' or 'official'.")
    return jnp.exp(s0 * math.log(mu0) / denominator)


def ict_num_scales(k, total_steps, s0=10, s1=1280):
    """iCT's exponential curriculum (Song & Dhariwal 2024):

    N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋.
    For K = 400k, s0 = 10, s1 = 1280: K' = 50k and N = 11, 21, 41, …, 1281.
    """
    stage_len = ict_stage_length(total_steps, s0, s1)
    doublings = jnp.asarray(k, jnp.int32) // stage_len
    # Cap the exponent so 2**doublings cannot overflow int32 late in long runs.
    doublings = jnp.minimum(doublings, int(math.log2(s1 // s0)) + 1)
    return jnp.minimum(s0 * 2**doublings, s1).astype(jnp.int32) + 1


def ict_stage_length(total_steps, s0=10, s1=1280):
    """K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, the number of steps between doublings of N (at least 1)."""
    return max(total_steps // (int(math.log2(s1 // s0)) + 1), 1)


# --------------------------------------------------------------------------- PD's stages
# Progressive distillation (Salimans & Ho 2022) as the CM paper's baseline and the official
# `progdist` scale mode: the student learns in N steps what its teacher does in 2N; every K
# steps the student becomes the teacher and N halves. With L = log2(N_0) the stages are
#   N_0, N_0/2, …, 4   for K steps each   (k < (L−1)·K),
#   2                  for 2K steps       ((L−1)·K ≤ k < (L+1)·K),
#   1                  from then on.
# Within a stage the learning rate decays linearly to 0 over its length (2K for the last
# two, whose rate stays 0 once decayed, as the official code).


def check_pd_schedule(start_scales, stage_steps):
    """One clear error for a PD curriculum that cannot halve down to one step."""
    if start_scales < 2 or start_scales & (start_scales - 1):
        raise ValueError(
            f"schedule.pd_start_scales={start_scales} must be a power of 2 ≥ 2, so "
            "that halving reaches one step."
        )
    if stage_steps < 1:
        raise ValueError(f"schedule.pd_stage_steps={stage_steps} must be at least 1.")


def _pd_stage_bounds(k, start_scales, stage_steps):
    """(N, first step of the stage, stage length) at step k; k may be traced."""
    check_pd_schedule(start_scales, stage_steps)
    log2_start = int(math.log2(start_scales))
    k = jnp.asarray(k, jnp.int32)
    halving_end = (log2_start - 1) * stage_steps  # N = 2 starts here
    final_start = (log2_start + 1) * stage_steps  # N = 1 starts here
    stage = jnp.minimum(k // stage_steps, log2_start)  # Capped: 2**stage stays in int32.
    n = jnp.where(k < halving_end, start_scales // 2**stage, jnp.where(k < final_start, 2, 1))
    first = jnp.where(
        k < halving_end, stage * stage_steps, jnp.where(k < final_start, halving_end, final_start)
    )
    length = jnp.where(k < halving_end, stage_steps, 2 * stage_steps)
    return n.astype(jnp.int32), first, length


def pd_num_scales(k, start_scales=4096, stage_steps=50_000):
    """N(k) of progressive distillation: 4096 for k < 50k, 2048, …, 4 (k < 550k), 2 until 650k,
    then 1, for the CIFAR-10 setting (N_0 = 4096, K = 50k)."""
    return _pd_stage_bounds(k, start_scales, stage_steps)[0]


def pd_learned_steps(k, start_scales=4096, stage_steps=50_000):
    """The steps the student has learned after k optimizer steps: N(k − 1), the N of the last
    step taken (sampling a checkpoint at a stage's end uses that stage's N)."""
    return pd_num_scales(jnp.maximum(jnp.asarray(k, jnp.int32) - 1, 0), start_scales, stage_steps)


def pd_starts_stage(k, start_scales=4096, stage_steps=50_000):
    """True at the first step of every stage after the first: the student becomes the teacher."""
    _, first, _ = _pd_stage_bounds(k, start_scales, stage_steps)
    return (jnp.asarray(k) == first) & (jnp.asarray(k) > 0)


def pd_lr_factor(k, start_scales=4096, stage_steps=50_000):
    """max(1 − (k − stage start)/stage length, 0): each stage's linear decay of the rate."""
    _, first, length = _pd_stage_bounds(k, start_scales, stage_steps)
    # The steps left in integers, then one division: no float32 cancellation near 0.
    left = jnp.maximum(first + length - jnp.asarray(k, jnp.int32), 0)
    return left.astype(jnp.float32) / length.astype(jnp.float32)


# --------------------------------------------------------------------------- ECT's Δt
# Easy consistency training (ECT; Geng et al. 2025, "Consistency Models Made Easy",
# locuslab/ect `ECMLoss`) trains in continuous time: t is drawn lognormally and the target sits
# at r = t − Δt, with Δt/t = q^{−(s+1)}·n(t) at stage s = ⌊k/d⌋ (d optimizer steps per stage),
# so Δt shrinks by q every stage: the continuous analogue of iCT doubling N. n(t) widens the gap
# at small t ("sigmoid" mapping n(t) = 1 + k·sigmoid(−b·t); "const": n = 1). r is clamped at 0,
# where the target is the data itself. (The official loop enters stage s one iteration later,
# at 1 + s·d, because its first progress tick is a single iteration.)
ECT_MAPPINGS = ("sigmoid", "const")
_ECT_SMALLEST_RATIO = 1e-5  # Δt/t below this vanishes in float32 (r would equal t).


def ect_stage(k, stage_steps):
    """s = ⌊k/d⌋, the number of times Δt has shrunk by q at step k (k may be traced)."""
    return jnp.asarray(k, jnp.int32) // stage_steps


def ect_dt_ratio(t, stage, q=2.0, k=8.0, b=1.0, mapping="sigmoid"):
    """Δt/t = q^{−(s+1)}·n(t), with n(t) = 1 + k·sigmoid(−b·t) or 1 ("const")."""
    if mapping == "sigmoid":
        n = 1.0 + k * jax.nn.sigmoid(-b * t)
    elif mapping == "const":
        n = jnp.ones_like(t)
    else:
        raise ValueError(f"Unknown ECT mapping {mapping!r}: use one of {ECT_MAPPINGS}.")
    decay = jnp.power(jnp.float32(q), -(jnp.asarray(stage, jnp.float32) + 1.0))
    return decay * n


def ect_r(t, stage, q=2.0, k=8.0, b=1.0, mapping="sigmoid"):
    """r = max(t·(1 − Δt/t), 0): the target's noise level for a student at t.

    CIFAR-10 (q = 2, k = 8, b = 1) at stage 0: Δt/t = ½·(1 + 8·sigmoid(−t)), so r = 0 for every
    t ≤ ln 7 ≈ 1.95 (the target is the clean image), r ≈ 1.712 at t = 4 and r = 40 at t = 80."""
    return jnp.maximum(t * (1.0 - ect_dt_ratio(t, stage, q, k, b, mapping)), 0.0)


def check_ect_schedule(ect_config, num_steps):
    """One clear error for an ECT schedule whose Δt cannot be represented, before training."""
    c = ect_config
    if c.mapping not in ECT_MAPPINGS:
        raise ValueError(f"ect.mapping={c.mapping!r}: use one of {ECT_MAPPINGS}.")
    if c.q <= 1.0:
        raise ValueError(f"ect.q={c.q} must be > 1: Δt shrinks by q every stage.")
    if c.stage_steps < 1:
        raise ValueError(f"ect.stage_steps={c.stage_steps} must be at least 1.")
    last_stage = (num_steps - 1) // c.stage_steps
    smallest = float(c.q) ** -(last_stage + 1)
    if smallest < _ECT_SMALLEST_RATIO:
        raise ValueError(
            f"ECT reaches stage {last_stage} of train.num_steps={num_steps}, where Δt/t = "
            f"q^-{last_stage + 1} = {smallest:.1e} is below float32's resolution "
            f"({_ECT_SMALLEST_RATIO:.0e}) and the target would equal the student: raise "
            f"ect.stage_steps={c.stage_steps} or lower ect.q={c.q}."
        )


# --------------------------------------------------------------------------- any schedule
KINDS = ("ct", "ict", "fixed", "pd")
MU_FORMULAS = ("paper", "official")
INDEX_SAMPLINGS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "ict", "snr", "snrp1", "truncated_snr")


def max_num_scales(schedule_config):
    """The largest N a schedule can reach: the static size of the grid buffers."""
    kind = schedule_config.kind
    if kind in ("ct", "ict"):
        return int(schedule_config.s1) + 1
    if kind == "fixed":
        return int(schedule_config.num_scales)
    if kind == "pd":
        return int(schedule_config.pd_start_scales)
    raise ValueError(f"Unknown schedule kind {kind!r}: use one of {KINDS}.")


def num_scales_and_target_ema(k, schedule_config, total_steps):
    """(N(k), μ(k)) for the configured curriculum.

    kind="ct":    original CT, N from `ct_num_scales`, μ from `ct_target_ema`.
    kind="ict":   iCT, N from `ict_num_scales`, μ = 0 (θ⁻ = stop_gradient(θ)).
    kind="fixed": N = num_scales and μ = target_ema (CD's N=18, μ=0 on CIFAR-10).
    kind="pd":    N from `pd_num_scales`, μ = 1: θ⁻ is PD's teacher, held fixed within a
                  stage and replaced by θ when a stage starts (`pd_starts_stage`).
    """
    c = schedule_config
    if c.kind == "ct":
        n = ct_num_scales(k, total_steps, c.s0, c.s1)
        return n, ct_target_ema(n, c.s0, c.mu0, c.mu_formula)
    if c.kind == "ict":
        return ict_num_scales(k, total_steps, c.s0, c.s1), jnp.float32(0.0)
    if c.kind == "fixed":
        return jnp.int32(c.num_scales), jnp.float32(c.target_ema)
    if c.kind == "pd":
        return pd_num_scales(k, c.pd_start_scales, c.pd_stage_steps), jnp.float32(1.0)
    raise ValueError(f"Unknown schedule kind {c.kind!r}: use one of {KINDS}.")


# --------------------------------------------------------------------------- which σ pair
def lognormal_pair_logits(num_scales, max_scales, p_mean=-1.1, p_std=2.0, **grid):
    """Log-probabilities of the pair index i ∈ {0..N−2} under iCT's discretised lognormal.

    p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std))
    (iCT's improved noise schedule): the lognormal mass between the two grid points. The
    buffer has the static length max_scales − 1; indices ≥ N − 1 get −inf.
    """
    i = jnp.arange(max_scales - 1)
    lo = karras.karras_sigma(i, num_scales, **grid)
    hi = karras.karras_sigma(i + 1, num_scales, **grid)
    cdf = lambda s: erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
    mass = cdf(hi) - cdf(lo)
    valid = i < num_scales - 1
    return jnp.where(valid & (mass > 0), jnp.log(jnp.where(valid, mass, 1.0)), -jnp.inf)


def sample_pair_index(
    rng, batch_size, num_scales, sampling, max_scales, p_mean=-1.1, p_std=2.0, **grid
):
    """Draw i per example, so that the student uses σ_{i+1} and the target σ_i.

    sampling="uniform":   i ~ U{0..N−2} (CM Algorithms 2 and 3).
    sampling="lognormal": iCT's discretised lognormal (`lognormal_pair_logits`).
    """
    if sampling == "uniform":
        return jax.random.randint(rng, (batch_size,), 0, num_scales - 1)
    if sampling == "lognormal":
        logits = lognormal_pair_logits(num_scales, max_scales, p_mean, p_std, **grid)
        return jax.random.categorical(rng, logits, shape=(batch_size,))
    raise ValueError(f"Unknown index sampling {sampling!r}: use 'uniform' or 'lognormal'.")


def pair_weight(sigma_lo, sigma_hi, weighting):
    """λ for the pair (σ_i, σ_{i+1}); the SNR weightings use the student's σ = σ_{i+1}.

    uniform: 1 (CM).   ict: 1/(σ_{i+1} − σ_i) (iCT's weighting).
    snr: 1/σ².   snrp1: 1/σ² + 1.   truncated_snr: max(1/σ², 1)  (official code's options).
    """
    snr = 1.0 / sigma_hi**2
    if weighting == "uniform":
        return jnp.ones_like(sigma_hi)
    if weighting == "ict":
        return 1.0 / (sigma_hi - sigma_lo)
    if weighting == "snr":
        return snr
    if weighting == "snrp1":
        return snr + 1.0
    if weighting == "truncated_snr":
        return jnp.maximum(snr, 1.0)
    raise ValueError(
        f"Unknown weighting {weighting!r}: use uniform, ict, snr, snrp1 or truncated_snr."
    )


# --------------------------------------------------------------------------- EDM teacher
def edm_sample_sigma(rng, batch_size, p_mean=-1.2, p_std=1.2):
    """EDM training noise levels: ln σ ~ N(P_mean, P_std²) (EDM Table 1)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(rng, (batch_size,)))


def edm_weight(sigma, sigma_data=0.5):
    """EDM loss weight λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1), which makes c_out²·λ = 1."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
