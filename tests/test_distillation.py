"""Consistency distillation end to end, in process: distil a tiny EDM teacher (the session's
`teacher_workdir`, tests/conftest.py)."""

import json
import os

import jax
import numpy as np
import pytest

from cm_jax import models, optim, teacher, trainer
from cm_jax.train_state import create_mesh, init_train_state
from configs import cifar10_cd_l2


def test_distil_from_a_trained_teacher(teacher_workdir, tiny_shards, tmp_path):
    config = cifar10_cd_l2.get_config("test")
    config.data.dir = tiny_shards
    config.teacher.workdir = teacher_workdir
    trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[-1]["step"] == config.train.num_steps and np.isfinite(rows[-1]["loss"])
    assert rows[-1]["num_scales"] == 18
    assert os.path.exists(tmp_path / "samples" / f"step_{config.train.num_steps:08d}.png")


def _teacher_config(workdir):
    c = cifar10_cd_l2.get_config("test").teacher
    c.workdir = workdir
    return c


def test_student_starts_from_the_teachers_ema(teacher_workdir):
    config = cifar10_cd_l2.get_config("test")
    mesh = create_mesh()
    net, run_config, params = teacher.load_teacher(_teacher_config(teacher_workdir), mesh)
    assert run_config.method == "edm"
    tx, _ = optim.make_optimizer(config.optim)
    state = init_train_state(config, net, tx, mesh, initial_params=params)
    for tree in (state.params, state.target_params, *state.ema_params.values()):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config.model.nf = 16
    with pytest.raises(ValueError, match="parameters differ from the teacher"):
        trainer._check_same_architecture(config, models.create_model(config.model), params)


def test_bad_teachers_are_clear_errors(teacher_workdir, tmp_path):
    config = _teacher_config(str(tmp_path))
    with pytest.raises(teacher.TeacherError, match="has no config.json"):
        teacher.load_teacher(config, create_mesh())
    config = _teacher_config(teacher_workdir)
    config.ema_rate = 0.5
    with pytest.raises(teacher.TeacherError, match="no EMA with rate 0.5"):
        teacher.load_teacher(config, create_mesh())
    config = _teacher_config(teacher_workdir)
    config.step = 999
    with pytest.raises(teacher.TeacherError, match="no checkpoint at step 999"):
        teacher.load_teacher(config, create_mesh())


def test_teacher_may_be_given_as_a_checkpoint_folder(teacher_workdir):
    mesh = create_mesh()
    _, _, newest = teacher.load_teacher(_teacher_config(teacher_workdir), mesh)
    config = _teacher_config(os.path.join(teacher_workdir, "checkpoints", "2"))
    _, _, at_2 = teacher.load_teacher(config, mesh)
    config = _teacher_config(teacher_workdir)
    config.step = 2
    _, _, by_step = teacher.load_teacher(config, mesh)
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
    for a, b in zip(leaves(at_2), leaves(by_step), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(at_2), leaves(newest)))
    config = _teacher_config(os.path.join(teacher_workdir, "checkpoints", "2"))
    config.step = 4
    with pytest.raises(teacher.TeacherError, match="checkpoint of step 2, but step 4"):
        teacher.load_teacher(config, mesh)


def test_the_teachers_dropout_is_never_applied_in_the_heun_step():
    """The official runs build the teacher with dropout (0.1; 0.13 on CIFAR-10) and call it in
    eval mode. The CD loss with a teacher of dropout 0.9 must equal, bitwise, the loss with the
    same weights and no dropout: the Heun step calls the teacher deterministically."""
    import jax.numpy as jnp

    from cm_jax import methods

    config = cifar10_cd_l2.get_config("test")
    student = models.create_model(config.model)
    with_dropout, without = (student.clone(dropout=rate) for rate in (0.9, 0.0))
    x = jnp.zeros((2, 16, 16, 3))
    params = student.init(jax.random.PRNGKey(0), x, jnp.zeros((2,)), None, train=False)["params"]
    # NCSN++ zero-initialises the convolution after each block's dropout: perturb every weight so
    # that dropout, were it applied, would change the teacher's output.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
    batch = {
        "image": jax.random.uniform(jax.random.PRNGKey(1), x.shape, minval=-1, maxval=1),
        "label": jnp.zeros((2,), jnp.int32),
    }

    def loss(teacher_net):
        loss_fn = methods.get_loss_fn(student, config, teacher_net)
        value, _ = jax.jit(loss_fn)(
            params, params, batch, jax.random.PRNGKey(2), 0, {"teacher": params}
        )
        return np.asarray(value)

    assert with_dropout.dropout == 0.9
    np.testing.assert_array_equal(loss(with_dropout), loss(without))
