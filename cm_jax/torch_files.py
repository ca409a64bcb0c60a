"""Reading PyTorch files (released checkpoints, VGG16 and Inception weights) safely: tensors
only, with `weights_only=True`, and one error naming the file that never invites loading it
with pickles (torch's own message suggests `weights_only=False`, which would run the file's
code). torch is imported only here, and only when a .pt/.pth file is read."""


class TorchFileError(ValueError):
    """A PyTorch file that cannot be read as tensors; the message names it."""


def _first_line_without_unsafe_advice(error):
    """The first line of torch's message, minus its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    safe = [line for line in lines if "weights_only" not in line and "pickle" not in line.lower()]
    return (safe or [type(error).__name__])[0][:200]


def load_tensors(path, what, needs_torch_hint=""):
    """torch.load(path) with weights_only=True; TorchFileError (or ImportError without torch)
    naming the file and what it should hold."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {path} (a PyTorch file) needs torch: `pip install torch==2.13.0` is the CPU "
            f"build. {needs_torch_hint}".strip()
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign, damaged or pickled files.
        raise TorchFileError(
            f"{path} is not a readable PyTorch file of {what} ({type(e).__name__}: "
            f"{_first_line_without_unsafe_advice(e)}). It must hold tensors only, as "
            "torch.save(model.state_dict(), path) writes them: cm_jax reads nothing else."
        ) from e
