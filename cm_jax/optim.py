"""Optimizers (optax) and the learning-rate schedule, from config.optim.

Warm-up and gradient clipping apply to every optimizer when set (the official CM code silently
ignored both on its RAdam path; here a configured value always takes effect, and the paper
configs set them to 0 where the paper used none).
"""

import optax

OPTIMIZERS = {
    "adam": lambda lr, c: optax.adam(lr, b1=c.beta1, b2=c.beta2, eps=c.eps),
    "radam": lambda lr, c: optax.radam(lr, b1=c.beta1, b2=c.beta2, eps=c.eps),
    "adamw": lambda lr, c: optax.adamw(
        lr, b1=c.beta1, b2=c.beta2, eps=c.eps, weight_decay=c.weight_decay
    ),
}


def learning_rate_schedule(optim_config):
    """Linear warm-up from 0 over warmup_steps, then constant (EDM and CM use constant rates)."""
    c = optim_config
    if c.warmup_steps > 0:
        return optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    return optax.constant_schedule(c.lr)


def make_optimizer(optim_config):
    """(optax transformation, lr schedule). Clipping by global norm comes first when
    grad_clip > 0."""
    c = optim_config
    if c.name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {c.name!r}: use one of {sorted(OPTIMIZERS)}.")
    schedule = learning_rate_schedule(c)
    tx = OPTIMIZERS[c.name](schedule, c)
    if c.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(c.grad_clip), tx)
    return tx, schedule
