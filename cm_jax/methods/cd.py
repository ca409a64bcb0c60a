"""Consistency distillation, CD (CM Algorithm 2): CT's loss with the target's input made by
one step of an EDM teacher's PF-ODE. The student starts from the teacher's weights unless
teacher.init_student is False."""

from cm_jax import ode, precond
from cm_jax.methods import base, ct


def consistency_distillation_loss(net, config, teacher_net):
    """L_CD (CM Algorithm 2): the target input is one step of the teacher's PF-ODE from σ_{i+1}
    to σ_i (Heun by default, as the paper; `teacher.solver=euler` for the first-order one).

    frozen["teacher"] holds the teacher's parameters (its evaluation EMA); the teacher runs
    deterministic (no dropout), as an ODE solver must.
    """
    if teacher_net is None:
        raise ValueError("method 'cd' needs a teacher: set config.teacher.workdir.")
    solver = ode.SOLVERS[config.teacher.solver]
    sigma_data = config.karras.sigma_data

    def teacher_ode_step(frozen, x, z, x_hi, sigma_hi, sigma_lo, labels):
        denoise = lambda v, s: precond.edm_denoiser(
            teacher_net, frozen["teacher"], v, s, labels, sigma_data=sigma_data
        )
        return solver(denoise, x_hi, sigma_hi, sigma_lo)

    return ct.consistency_loss(net, config, teacher_ode_step)


class CD(base.Method):
    name = "cd"
    has_target_network = True
    distills = True
    student_start = base.OPTIONAL

    def loss_fn(self, net, config, teacher_net=None):
        return consistency_distillation_loss(net, config, teacher_net)

    def check_config(self, config):
        super().check_config(config)
        base.require_teacher(self, config, "CD distils an EDM teacher")
