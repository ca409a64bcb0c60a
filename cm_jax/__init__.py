"""cm_jax: consistency models in JAX/Flax.

The modules follow the data flow: configs -> data -> models (network) and karras
(preconditioning) -> schedules and losses (method) -> trainer -> sampling.
"""
