"""cm_jax: consistency models in JAX/Flax.

The modules follow the data flow: configs -> data -> models (network) and karras
(preconditioning) -> schedules and methods (one module per training method: its loss and
what the trainer asks of it) -> trainer -> sampling -> evaluation.
"""
