"""The XLA flags of the test session, for the launch.py processes tests start."""

# The tests' networks are tiny, so their compile time is mostly LLVM optimising CPU code that
# then runs a few steps: without its expensive passes a `:test` run compiles about 30 % faster
# (its init program 2.5x) and computes the same losses. Tests only: users keep XLA's defaults.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices):
    """XLA_FLAGS for a process with `devices` fake CPU devices, compiling as the tests do."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
