"""The training objectives.

The exact consistency function of a point-mass data distribution (every image equal to x0) is
known in closed form: the PF-ODE trajectories are x_σ = x0 + σ·z, so f*(x_σ, σ) = x0 + σ_min·z.
A network that realises f* must get zero CT loss under every curriculum, metric and weighting,
and the exact denoiser D* = x0 must get zero EDM loss; any other network must not.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm_jax import karras, lpips, methods, precond
from configs import cifar10_cd_l2, cifar10_ct, cifar10_edm, cifar10_ict

SIZE = 8


class OracleNet:
    """F such that the preconditioned output is the exact answer for point-mass data at x0.

    It recovers σ from c_noise = ¼·ln σ and x_σ from c_in·x_σ, then solves the preconditioning
    for F. `error` adds error·σ to the answer: a model that is wrong, and inconsistent across
    noise levels, which the losses must penalise.
    """

    def __init__(self, kind, sigma_min=0.002, error=0.0):
        self.kind, self.sigma_min, self.error = kind, sigma_min, error

    def apply(self, variables, x_in, c_noise, labels, train, rngs=None):
        x0 = variables["params"]["x0"]
        sigma = jnp.exp(4.0 * c_noise)[:, None, None, None]
        if self.kind == "consistency":
            s = karras.consistency_scalings(sigma, 0.5, self.sigma_min)
            x_sigma = x_in / s.c_in
            answer = x0 + self.sigma_min * (x_sigma - x0) / sigma + self.error * sigma
        else:
            s = karras.edm_scalings(sigma, 0.5)
            x_sigma = x_in / s.c_in
            answer = x0 + self.error
        safe_c_out = jnp.where(s.c_out == 0, 1.0, s.c_out)
        return jnp.where(s.c_out == 0, 0.0, (answer - s.c_skip * x_sigma) / safe_c_out)


class ToyNet(nn.Module):
    """A small noise-conditional conv net with dropout, for gradient and rng tests."""

    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, c_noise, labels=None, *, train):
        h = nn.Conv(3, (3, 3))(x) + nn.Dense(3)(c_noise[:, None])[:, None, None, :]
        return nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))


def _batch(x0, n=16):
    return {"image": jnp.broadcast_to(x0, (n,) + x0.shape), "label": jnp.zeros((n,), jnp.int32)}


def _x0():
    return jax.random.uniform(jax.random.PRNGKey(3), (SIZE, SIZE, 3), minval=-1, maxval=1)


def _config(module, **loss_overrides):
    config = module.get_config("test")
    config.data.image_size = SIZE
    config.loss.update(loss_overrides)
    return config


RECIPES = {
    "ct-l2-uniform": (cifar10_ct, {}),
    "ct-l1-snr": (cifar10_ct, {"distance": "l1", "weighting": "snrp1"}),
    "ict": (cifar10_ict, {}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("step", [0, 3])
def test_ct_loss_vanishes_for_the_exact_consistency_function(recipe, step):
    module, overrides = RECIPES[recipe]
    config = _config(module, **overrides)
    config.train.num_steps = 4
    params = {"x0": _x0()}
    loss_fn = methods.get_loss_fn(OracleNet("consistency"), config)
    loss, metrics = loss_fn(params, params, _batch(params["x0"]), jax.random.PRNGKey(step), step)
    # Float32 rounding only (amplified by 1/σ² weights near σ_min).
    assert float(loss) < 1e-5, (recipe, float(loss))
    assert int(metrics["num_scales"]) >= 2

    wrong = methods.get_loss_fn(OracleNet("consistency", error=0.05), config)
    bad, _ = wrong(params, params, _batch(params["x0"]), jax.random.PRNGKey(step), step)
    assert float(bad) > 1e-3, (recipe, float(bad))


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_loss_vanishes_for_the_exact_student_and_teacher(solver):
    config = _config(cifar10_cd_l2)
    config.teacher.solver = solver
    params = {"x0": _x0()}
    batch = _batch(params["x0"])
    loss_fn = methods.get_loss_fn(OracleNet("consistency"), config, OracleNet("edm"))
    loss, metrics = loss_fn(params, params, batch, jax.random.PRNGKey(0), 0, {"teacher": params})
    assert int(metrics["num_scales"]) == 18
    assert float(loss) < 1e-9
    # A teacher that denoises to the wrong image moves the target off the trajectory.
    wrong = {"x0": params["x0"] + 0.2}
    bad, _ = loss_fn(params, params, batch, jax.random.PRNGKey(0), 0, {"teacher": wrong})
    assert float(bad) > 1e-4
    with pytest.raises(ValueError, match="needs a teacher"):
        methods.get_loss_fn(OracleNet("consistency"), config)


def test_edm_loss_vanishes_for_the_exact_denoiser():
    config = _config(cifar10_edm)
    params = {"x0": _x0()}
    loss, _ = methods.get_loss_fn(OracleNet("edm"), config)(
        params, None, _batch(params["x0"]), jax.random.PRNGKey(0), 0
    )
    assert float(loss) < 1e-9
    # D = x0 + 0.1 everywhere: each example costs λ(σ)·0.01 with λ(σ) ≥ 1/σ_d² = 4.
    bad, _ = methods.get_loss_fn(OracleNet("edm", error=0.1), config)(
        params, None, _batch(params["x0"]), jax.random.PRNGKey(0), 0
    )
    assert float(bad) >= 0.04


def _toy_setup(module=cifar10_ct):
    config = _config(module)
    net = ToyNet()
    x = _batch(_x0(), n=4)
    params = net.init(jax.random.PRNGKey(0), x["image"], jnp.zeros((4,)), train=False)["params"]
    target = jax.tree.map(lambda p: p + 0.1, params)
    return config, net, x, params, target


def test_gradient_flows_only_through_the_online_branch():
    config, net, batch, params, target = _toy_setup()
    loss_fn = methods.get_loss_fn(net, config)
    grad_online, grad_target = jax.grad(
        lambda p, t: loss_fn(p, t, batch, jax.random.PRNGKey(1), 2)[0], argnums=(0, 1)
    )(params, target)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_target))
    assert any(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grad_online))


def test_online_and_target_share_the_dropout_key(monkeypatch):
    seen = []
    original = precond.consistency_fn

    def spy(*args, dropout_rng=None, **kwargs):
        seen.append(np.asarray(jax.random.key_data(dropout_rng)))
        return original(*args, dropout_rng=dropout_rng, **kwargs)

    monkeypatch.setattr(precond, "consistency_fn", spy)
    config, net, batch, params, target = _toy_setup()
    methods.get_loss_fn(net, config)(params, target, batch, jax.random.PRNGKey(1), 2)
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[0], seen[1])


def test_unknown_method_is_a_clear_error():
    config = _config(cifar10_ct)
    config.method = "gan"
    with pytest.raises(ValueError, match="Unknown method 'gan'"):
        methods.get_loss_fn(ToyNet(), config)


def test_lpips_metric_reads_its_weights_from_frozen():
    config = _config(cifar10_ct, distance="lpips", lpips_resize=32)
    params = {"x0": _x0()}
    frozen = {"lpips": lpips.init_params(0)}
    loss_fn = methods.get_loss_fn(OracleNet("consistency"), config)
    loss, _ = loss_fn(params, params, _batch(params["x0"], n=4), jax.random.PRNGKey(0), 3, frozen)
    assert float(loss) < 1e-6
    wrong = methods.get_loss_fn(OracleNet("consistency", error=0.05), config)
    bad, _ = wrong(params, params, _batch(params["x0"], n=4), jax.random.PRNGKey(0), 3, frozen)
    assert float(bad) > 1e-6
