"""The XLA flags of the test session, for the launch.py processes tests start."""

# The tests' networks are tiny, so their compile time is mostly XLA generating CPU code that
# then runs a few steps: without LLVM's expensive passes a `:test` run compiles about 30 % faster
# (its init program 2.5x) and computes the same losses, and with XLA's older fusion emitters
# the `:test` train step compiles in 15-18 s instead of 22-25 s (two runs each, 8 devices).
# Tests only: users keep XLA's defaults. (These flags exist in jaxlib 0.10; XLA aborts on a flag
# it does not know.)
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
)


def xla_flags(devices):
    """XLA_FLAGS for a process with `devices` fake CPU devices, compiling as the tests do."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
