"""Training methods: `config.method` -> the Method that trains it, one module per family.

    edm   the EDM diffusion teacher                         methods/edm.py
    ct    consistency training, CT and iCT                  methods/ct.py
    cd    consistency distillation                          methods/cd.py
    pd    progressive distillation, the CM paper's baseline methods/pd.py
    ect   easy consistency training                         methods/ect.py
    sct   sCM's continuous-time consistency training        methods/scm.py
    scd   sCM's continuous-time consistency distillation    methods/scm.py

Adding a method is adding a module with its loss and a `base.Method` subclass, and one entry
here; see base.py for what a method declares.
"""

from cm_jax.methods import cd, ct, ect, edm, pd, scm
from cm_jax.methods.base import Method

METHODS = {
    m.name: m for m in (edm.EDM(), ct.CT(), cd.CD(), pd.PD(), ect.ECT(), scm.SCT(), scm.SCD())
}


def get(name) -> Method:
    """The method registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}: use one of {sorted(METHODS)}.")
    return METHODS[name]


def of(config) -> Method:
    """The method of a run's config (config.method)."""
    return get(config.method)


def get_loss_fn(net, config, teacher_net=None):
    """The loss of config.method, applied to the network, config and teacher."""
    return of(config).loss_fn(net, config, teacher_net)
