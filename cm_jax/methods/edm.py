"""The EDM diffusion teacher (Karras et al. 2022): denoising score matching. Its runs are the
teachers of CD, PD and sCD and the starting points of ECT and sCM; they sample with EDM's
Heun solver."""

import jax
import jax.numpy as jnp

from cm_jax import distances, karras, precond, schedules
from cm_jax.methods import base


def edm_loss(net, config, teacher_net=None):
    """EDM denoising score matching (Karras et al. 2022, Eq. 8 with Table 1's choices):

    ln σ ~ N(P_mean, P_std²), n ~ N(0, σ²I), loss = λ(σ)·‖D_θ(x + n; σ) − x‖²/d.
    The squared error is averaged over pixels (as the official CM code does; EDM sums), which
    only rescales the loss. target_params is unused: a diffusion model has no target network.
    """
    del teacher_net
    kc, edm = config.karras, config.edm

    def loss_fn(params, target_params, batch, rng, step, frozen=None):
        del target_params, step, frozen
        x, labels = batch["image"], base.class_labels(batch, config.model)
        sigma_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        sigma = schedules.edm_sample_sigma(sigma_rng, x.shape[0], edm.p_mean, edm.p_std)
        n = karras.per_example(sigma, x) * jax.random.normal(noise_rng, x.shape, x.dtype)
        noisy = x + n
        denoised = precond.edm_denoiser(
            net,
            params,
            noisy,
            sigma,
            labels,
            sigma_data=kc.sigma_data,
            train=True,
            dropout_rng=dropout_rng,
        )
        per_example = schedules.edm_weight(sigma, kc.sigma_data) * distances.l2(denoised, x)
        loss = jnp.mean(per_example)
        return loss, {"loss": loss}

    return loss_fn


class EDM(base.Method):
    name = "edm"
    teaches = True
    uses_loss_distance = False  # The score-matching loss is a weighted l2, whatever loss.distance.
    sampler = "edm"

    def loss_fn(self, net, config, teacher_net=None):
        return edm_loss(net, config, teacher_net)
