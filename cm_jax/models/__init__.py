"""Model registry: config.model.name -> a Flax module built from the other config.model fields.

Adding an architecture is adding a file and one entry here.
"""

from cm_jax.models import adm, ncsnpp

MODELS = {"ncsnpp": ncsnpp.NCSNpp, "adm": adm.ADM}


def create_model(model_config):
    """Instantiate config.model.name with the remaining fields as keyword arguments."""
    kwargs = model_config.to_dict()
    name = kwargs.pop("name")
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}: use one of {sorted(MODELS)}.")
    # Flax module fields must be hashable: config lists become tuples.
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"config.model does not fit model {name!r}: {e}") from e
