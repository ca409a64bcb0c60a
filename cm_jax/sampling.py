"""Samplers: consistency sampling (one step and CM Algorithm 1) and EDM's Heun / Euler samplers.

Every sampler is a pure function of (network, params, noise, keys); the caller jits it (with the
time points as constants). Images are in [−1, 1], NHWC.

The module reads top to bottom:

1. Per-sample noise: sample i's noise is drawn from fold_in(PRNGKey(seed), i), and the noise of
   step n from fold_in of that key with n, so an image depends on its index only, never on the
   batch size or the device count it was drawn with.
2. Time points: the official `ts` index convention, and the checks on a σ sequence.
3. Consistency sampling: `consistency_steps` (CM Algorithm 1, with the replacement hook that CM
   Algorithm 4 needs), `onestep_sample`, `multistep_sample`.
4. EDM samplers for diffusion teachers: `edm_sample` (EDM Algorithm 2; Algorithm 1 when
   S_churn = 0) over any denoiser, `edm_network_sample` over a network.
5. `pd_sample`: the N Euler steps a progressive-distillation student was trained to take.
6. `Sampler`: one of these, with its settings, as a hashable value (the generator and the
   trainer's sample grids compile one program per value), and `sampler_for`, which picks it
   from the kind a method declares and the `sample` options.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import karras, ode, precond

# ----------------------------------------------------------------------------------------
# Per-sample noise
# ----------------------------------------------------------------------------------------


def sample_keys(seed, indices):
    """One key per sample: fold_in(PRNGKey(seed), index), as raw uint32 key data [B, 2]."""
    indices = jnp.asarray(indices, jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(indices)


def sample_noise(seed, indices, shape):
    """z ~ N(0, I) of shape [B, *shape], sample b from fold_in(PRNGKey(seed), indices[b]).

    The same index gives the same noise whatever batch it is drawn in.
    """
    return _normal_per_key(jax.random.wrap_key_data(sample_keys(seed, indices)), tuple(shape))


def per_sample_keys(noise_rng, batch_size):
    """Typed keys [B] from raw key data [B, 2] (e.g. `sample_keys`) or typed keys [B]."""
    keys = noise_rng
    if not jax.dtypes.issubdtype(jnp.asarray(keys).dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(jnp.asarray(keys))
    if keys.shape != (batch_size,):
        raise ValueError(
            f"noise_rng must hold one key per sample ({batch_size}; see sample_keys), got "
            f"{keys.shape[0] if keys.ndim else 'a single key'} (key shape {keys.shape})"
        )
    return keys


def step_noise(keys, step, shape):
    """z_n of step n for every sample: N(0, I) from fold_in(key_b, n); keys are typed [B]."""
    return _normal_per_key(jax.vmap(lambda k: jax.random.fold_in(k, step))(keys), tuple(shape))


def _normal_per_key(keys, shape):
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


# ----------------------------------------------------------------------------------------
# Time points
# ----------------------------------------------------------------------------------------


def sigmas_from_indices(ts, num_scales, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """The σ sequence of `multistep_sample` for the official `ts` (openai/consistency_models).

    ts are ascending integer indices into the DESCENDING N-point Karras grid (index 0 = σ_max,
    N−1 = σ_min), e.g. ts=(0, 22, 39) with N=40. The official sampler evaluates f_θ at every
    time point but the last, whose level only sets the noise added after the last step. That
    last point is σ_min in all published settings, where the added noise √(σ_min² − σ_min²)
    is zero and f_θ(x, σ_min) = x (CM §3), so a final index N−1 is dropped: (0, 22, 39) gives
    [σ_0, σ_22], two network evaluations, as the official code. Any other final index is kept
    and evaluated (the official code would instead return an image still noisy at that level).
    """
    ts = _check_indices(ts, num_scales)
    if len(ts) > 1 and ts[-1] == num_scales - 1:
        ts = ts[:-1]
    # The official formula, descending, in float64, clipped as the official code clips.
    hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (hi + np.asarray(ts, np.float64) / (num_scales - 1) * (lo - hi)) ** rho
    return np.clip(sigmas, sigma_min, sigma_max).astype(np.float32)


def _check_indices(ts, num_scales):
    """ts as a list of ints, or one ValueError naming what is wrong with them."""
    if int(num_scales) != num_scales or num_scales < 2:
        raise ValueError(f"num_scales must be an integer N ≥ 2, got {num_scales}")
    ts_array = np.asarray(ts)
    if ts_array.ndim != 1 or ts_array.size == 0:
        raise ValueError(f"sampling indices ts must be a non-empty list, got {ts!r}")
    if not np.all(np.mod(ts_array, 1) == 0):
        raise ValueError(f"sampling indices ts must be integers, got {ts_array.tolist()}")
    ts = [int(t) for t in ts_array]
    if ts[0] != 0:
        raise ValueError(f"sampling indices ts must start at 0 (σ_max), got {ts}")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"sampling indices ts must be strictly increasing, got {ts}")
    if ts[-1] > num_scales - 1:
        raise ValueError(
            f"sampling indices ts must lie in [0, N−1] = [0, {num_scales - 1}], got {ts}"
        )
    return ts


# Time points written as float32 may exceed the float64 bounds by one rounding.
_ROUNDING = 1e-6


def validate_sigmas(sigmas, sigma_max=None, sigma_min=None):
    """Check a σ sequence for CM Algorithm 1 and return it as float32 numpy.

    Strictly decreasing, positive, the first ≤ σ_max and each ≥ σ_min (a bound that is None is
    not checked). One ValueError per problem, naming the sequence.
    """
    values = np.asarray(sigmas, np.float64)
    shown = [float(f"{s:.6g}") for s in np.ravel(values)]
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"sampling time points must be a non-empty 1-D list, got {shown}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"sampling time points must be positive and finite, got {shown}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"sampling time points must be strictly decreasing, got {shown}")
    if sigma_max is not None and values[0] > sigma_max * (1 + _ROUNDING):
        raise ValueError(
            f"the first sampling time point must be ≤ σ_max = {sigma_max}, got {shown}"
        )
    if sigma_min is not None and values[-1] < sigma_min * (1 - _ROUNDING):
        raise ValueError(f"sampling time points must be ≥ σ_min = {sigma_min}, got {shown}")
    return values.astype(np.float32)


def time_points(sigmas, sigma_max=None, sigma_min=None):
    """σ's as a float32 array, validated when they are concrete (traced ones pass unchecked)."""
    try:
        values = np.asarray(sigmas)
    except jax.errors.TracerArrayConversionError:
        return jnp.asarray(sigmas, jnp.float32)
    return jnp.asarray(validate_sigmas(values, sigma_max, sigma_min))


# ----------------------------------------------------------------------------------------
# Consistency sampling
# ----------------------------------------------------------------------------------------


def bind_consistency_fn(net, params, labels=None, *, sigma_data=0.5, sigma_min=0.002):
    """f_θ(x, σ) as a function of (x, σ) alone, for `consistency_steps` and editing.py."""
    return lambda x, sigma: precond.consistency_fn(
        net, params, x, sigma, labels, sigma_data=sigma_data, sigma_min=sigma_min
    )


def consistency_steps(
    consistency_fn, x, sigmas, noise_rng=None, *, sigma_min=0.002, clip=True, project=None
):
    """CM Algorithm 1 from an x already noisy at σ_0 = sigmas[0].

    x0 = f(x, σ_0); then for each later σ_n: x = x0 + √(σ_n² − σ_min²)·z_n, x0 = f(x, σ_n).
    Each x0 is clipped to [−1, 1] (when `clip`), then passed through `project` if given: the
    replacement of CM Algorithm 4 (editing.py). z_n comes from fold_in(noise_rng[b], n), so
    noise_rng holds one key per sample and may be None for a single time point.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def denoise(x, sigma):
        x0 = consistency_fn(x, sigma)
        x0 = jnp.clip(x0, -1.0, 1.0) if clip else x0
        return project(x0) if project is not None else x0

    x0 = denoise(x, sigmas[0])
    if sigmas.shape[0] == 1:
        return x0
    if noise_rng is None:
        raise ValueError(
            f"{sigmas.shape[0]} time points need noise_rng (one key per sample) "
            "for the noise between steps"
        )
    keys = per_sample_keys(noise_rng, x.shape[0])

    def step(x0, inputs):
        sigma, n = inputs
        # Back up to σ_n: the noise is √(σ_n² − σ_min²) because x0 sits at σ_min, not 0.
        x = x0 + jnp.sqrt(sigma**2 - sigma_min**2) * step_noise(keys, n, x0.shape[1:])
        return denoise(x, sigma), None

    steps = jnp.arange(1, sigmas.shape[0], dtype=jnp.uint32)
    x0, _ = jax.lax.scan(step, x0, (sigmas[1:], steps))
    return x0


def onestep_sample(net, params, z, labels=None, *, sigma_max=80.0, sigma_min=0.002, sigma_data=0.5):
    """x = f_θ(σ_max·z, σ_max): one network evaluation (CM Algorithm 1 with a single step)."""
    x = precond.consistency_fn(
        net, params, sigma_max * z, sigma_max, labels, sigma_data=sigma_data, sigma_min=sigma_min
    )
    return jnp.clip(x, -1.0, 1.0)


def multistep_sample(
    net,
    params,
    z,
    sigmas,
    labels=None,
    *,
    noise_rng=None,
    sigma_min=0.002,
    sigma_data=0.5,
    sigma_max=None,
    clip=True,
):
    """CM Algorithm 1: x = σ_0·z, then `consistency_steps` over sigmas (e.g. [80.0, 0.821]).

    len(sigmas) network evaluations; one σ is `onestep_sample` exactly. noise_rng: one key per
    sample (`sample_keys(seed, indices)`), so an image depends only on its own index. Concrete
    sigmas are checked by `validate_sigmas` (σ_max too when given).
    """
    sigmas = time_points(sigmas, sigma_max, sigma_min)
    f = bind_consistency_fn(net, params, labels, sigma_data=sigma_data, sigma_min=sigma_min)
    return consistency_steps(f, sigmas[0] * z, sigmas, noise_rng, sigma_min=sigma_min, clip=clip)


# ----------------------------------------------------------------------------------------
# EDM samplers (diffusion teachers)
# ----------------------------------------------------------------------------------------


def edm_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's time steps: the Karras grid descending from σ_max to σ_min, then σ_N = 0
    (EDM Eq. 5)."""
    sigmas = karras.karras_sigmas(num_steps, sigma_min, sigma_max, rho)[::-1]
    return jnp.concatenate([sigmas, jnp.zeros((1,), sigmas.dtype)])


def edm_sample(
    denoise,
    z,
    sigmas,
    *,
    solver="heun",
    S_churn=0.0,
    S_tmin=0.0,
    S_tmax=float("inf"),
    S_noise=1.0,
    noise_rng=None,
):
    """EDM Algorithm 2 over any denoiser D(x, σ); with S_churn = 0 it is EDM Algorithm 1.

    sigmas: σ_0 > … > σ_{N−1} > σ_N = 0 (`edm_sigmas`); x_0 = σ_0·z. At each step the churn
    raises σ_i to σ̂ = (1 + γ_i)·σ_i by adding noise, γ_i = min(S_churn/N, √2 − 1) inside
    [S_tmin, S_tmax] and 0 outside; then one ODE step from σ̂ to σ_{i+1}: Heun (EDM's second
    order correction, 2N − 1 evaluations) or Euler (N). The step to σ_N = 0 is always Euler,
    as EDM: the slope at σ = 0 is undefined. Returns the unclipped x_N.
    """
    if solver not in ode.SOLVERS:
        raise ValueError(f"Unknown EDM solver {solver!r}: use one of {sorted(ode.SOLVERS)}")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    num_steps = sigmas.shape[0] - 1
    churn = _churn_fn(z, num_steps, S_churn, S_tmin, S_tmax, S_noise, noise_rng)

    def step(solve):
        def body(x, i):
            x_hat, sigma_hat = churn(x, sigmas[i], i)
            return solve(denoise, x_hat, sigma_hat, sigmas[i + 1]), None

        return body

    x = sigmas[0] * z
    steps = jnp.arange(num_steps, dtype=jnp.uint32)
    # Every step but the last with the chosen solver; the last (to σ = 0) with Euler.
    x, _ = jax.lax.scan(step(ode.SOLVERS[solver]), x, steps[:-1])
    x, _ = step(ode.euler_step)(x, steps[-1])
    return x


def _churn_fn(z, num_steps, S_churn, S_tmin, S_tmax, S_noise, noise_rng):
    """(x_i, σ_i, i) -> (x̂_i, σ̂_i) of EDM Algorithm 2 lines 4-6; the identity when S_churn = 0."""
    if S_churn < 0:
        raise ValueError(f"S_churn must be ≥ 0, got {S_churn}")
    if S_churn == 0:
        return lambda x, sigma, i: (x, sigma)
    if noise_rng is None:
        raise ValueError("S_churn > 0 adds noise: give noise_rng (one key per sample)")
    keys = per_sample_keys(noise_rng, z.shape[0])
    gamma_max = min(S_churn / num_steps, math.sqrt(2.0) - 1.0)

    def churn(x, sigma, i):
        gamma = jnp.where((sigma >= S_tmin) & (sigma <= S_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        eps = S_noise * step_noise(keys, i, x.shape[1:])
        return x + jnp.sqrt(sigma_hat**2 - sigma**2) * eps, sigma_hat

    return churn


def edm_network_sample(
    net,
    params,
    z,
    labels=None,
    *,
    solver="heun",
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    sigma_data=0.5,
    S_churn=0.0,
    S_tmin=0.0,
    S_tmax=float("inf"),
    S_noise=1.0,
    noise_rng=None,
    clip_denoised=False,
):
    """EDM's sampler with the network as D_θ: `solver` "heun" takes 2·num_steps − 1 evaluations
    (35 for 18), "euler" num_steps.

    Deterministic (EDM Algorithm 1) by default; S_churn > 0 adds EDM Algorithm 2's noise and
    needs noise_rng, one key per sample. The result is clipped to [−1, 1]; with clip_denoised
    so is every D_θ(x; σ) the solver sees (openai/consistency_models' `karras_sample` with
    clip_denoised=True, the default of its ImageNet-64 and LSUN samplers).
    """

    def denoise(x, s):
        denoised = precond.edm_denoiser(net, params, x, s, labels, sigma_data=sigma_data)
        return jnp.clip(denoised, -1.0, 1.0) if clip_denoised else denoised

    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)
    x = edm_sample(
        denoise,
        z,
        sigmas,
        solver=solver,
        S_churn=S_churn,
        S_tmin=S_tmin,
        S_tmax=S_tmax,
        S_noise=S_noise,
        noise_rng=noise_rng,
    )
    return jnp.clip(x, -1.0, 1.0)


# ----------------------------------------------------------------------------------------
# Progressive distillation
# ----------------------------------------------------------------------------------------


def pd_sample(
    net,
    params,
    z,
    labels=None,
    *,
    num_steps,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    sigma_data=0.5,
):
    """A PD student's sampler (the official `progressive_distillation` sampler): x = σ_max·z,
    then num_steps deterministic Euler steps of D_θ down the (num_steps + 1)-point Karras grid
    to σ_min, the grid the student was trained on (methods/pd.py).
    num_steps may be traced (the trainer's grids follow the curriculum). Clipped to [−1, 1].
    """
    denoise = lambda x, s: precond.edm_denoiser(net, params, x, s, labels, sigma_data=sigma_data)
    grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)

    def step(n, x):  # Grid index num_steps − n down to num_steps − n − 1 (ascending grid).
        sigma_from = karras.karras_sigma(num_steps - n, num_steps + 1, **grid)
        sigma_to = karras.karras_sigma(num_steps - n - 1, num_steps + 1, **grid)
        return ode.euler_step(denoise, x, sigma_from, sigma_to)

    x = jax.lax.fori_loop(0, num_steps, step, sigma_max * z)
    return jnp.clip(x, -1.0, 1.0)


# ----------------------------------------------------------------------------------------
# Samplers as values
# ----------------------------------------------------------------------------------------

SAMPLER_KINDS = ("consistency", "edm", "pd")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A way to turn noise into images, with its settings, hashable so that compiled programs
    can be cached per value.

    kind "consistency": CM Algorithm 1 over `sigmas`; "edm": EDM's sampler with `num_steps`
    steps of `solver`; "pd": a PD student's `num_steps` Euler steps. Which kind a run uses is
    declared by its method (cm_jax/methods).
    """

    kind: str
    sigmas: tuple = ()
    num_steps: int = 0
    solver: str = "heun"
    clip_denoised: bool = True

    def __call__(
        self, net, params, z, labels, keys, *, sigma_min, sigma_max, rho, sigma_data, learned=0
    ):
        """Images in [−1, 1] from the noise z [B, H, W, C]; keys: one per sample (or None for
        a deterministic sampler). A "pd" sampler with num_steps 0 takes the `learned` steps,
        which may be traced (one program for every stage of a PD run)."""
        if self.kind == "consistency":
            return multistep_sample(
                net,
                params,
                z,
                jnp.asarray(self.sigmas),
                labels,
                noise_rng=keys,
                sigma_min=sigma_min,
                sigma_data=sigma_data,
                clip=self.clip_denoised,
            )
        grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigma_data=sigma_data)
        if self.kind == "edm":
            return edm_network_sample(
                net,
                params,
                z,
                labels,
                solver=self.solver,
                num_steps=self.num_steps,
                clip_denoised=self.clip_denoised,
                **grid,
            )
        return pd_sample(net, params, z, labels, num_steps=self.num_steps or learned, **grid)


def sampler_for(kind, sigmas=(), edm_steps=18, edm_solver="heun", pd_steps=0, clip_denoised=None):
    """The Sampler of a method's declared `kind` with the given options: the consistency time
    points (already validated), the EDM steps, solver and per-step clipping, or the PD
    student's steps (0: the steps it has learned, given when sampling). clip_denoised=None is
    each kind's own default: consistency sampling clips every step (CM Algorithm 1 as both
    official codes run it), EDM's sampler only its result."""
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"Unknown sampler kind {kind!r}: use one of {SAMPLER_KINDS}.")
    if clip_denoised is None:
        clip_denoised = kind == "consistency"
    if kind == "consistency":
        return Sampler(kind, sigmas=tuple(float(s) for s in sigmas), clip_denoised=clip_denoised)
    if kind == "edm":
        if edm_solver not in ode.SOLVERS:
            raise ValueError(
                f"Unknown EDM solver {edm_solver!r}: use one of {sorted(ode.SOLVERS)}."
            )
        return Sampler(
            kind, num_steps=int(edm_steps), solver=edm_solver, clip_denoised=bool(clip_denoised)
        )
    return Sampler(kind, num_steps=int(pd_steps))
