"""The Inception Score's classifier: the TF-Inception graph's 2048->1008 ``softmax/logits``
layer, which the FID weights (``default_1.pt``) lack, read from pytorch-fid's weights file.

    python -m cm_jax.evaluation.classifier --pth pt_inception-2015-12-05-6726825d.pth [--out PATH]

pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` is a torch state dict of torchvision's
Inception-v3 built with 1008 classes and ported from the same 2015-12-05 graph; its
``fc.weight`` [1008, 2048] is the graph's ``softmax/logits`` weight, transposed. The reference
Inception Score code (improved-gan's ``inception_score.py``, guided-diffusion's ``evaluator.py``)
computes ``softmax(pool3 @ W)`` with W the input of the op ``softmax/logits/MatMul``: the bias
is *not* added (torch-fidelity calls these logits ``logits_unbiased``). So only
W = ``fc.weight``.T is read; the bias and the convolutions are left alone (pool3 comes from
``inception.py``).

``eval.classifier_path`` takes either the .pth (torch needed, the CPU build is enough, and
imported only then) or the npz this converter writes (numpy only).
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np

from cm_jax import torch_files
from cm_jax.evaluation import fid

NUM_CLASSES = 1008  # the graph's output size
POOL3_DIM = 2048
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = "python -m cm_jax.evaluation.classifier"


def default_path() -> str:
    """Where the converter writes the npz by default, beside the converted FID weights."""
    return os.path.join(os.path.expanduser("~"), ".cache", "cm_jax", "inception_classifier.npz")


def _checked(weight: np.ndarray, shape: tuple[int, int], path: str, name: str) -> np.ndarray:
    if weight.shape != shape:
        raise ValueError(
            f"{name} in {path} has shape {tuple(weight.shape)}, expected {shape}: "
            f"not the 2015-12-05 graph's {NUM_CLASSES}-way classifier (use "
            f"pytorch-fid's {PYTORCH_FID_FILE})"
        )
    return np.asarray(weight, np.float32)


def read_pth(path: str) -> np.ndarray:
    """W [2048, 1008] (logits = pool3 @ W) from pytorch-fid's state dict: ``fc.weight``.T."""
    hint = f"Or convert it elsewhere with `{CONVERT_COMMAND} --pth {path}` and give the npz."
    state = torch_files.load_tensors(path, f"pytorch-fid's {PYTORCH_FID_FILE}", hint)
    if not isinstance(state, dict) or "fc.weight" not in state:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{path} has no fc.weight (it holds {keys}): not pytorch-fid's {PYTORCH_FID_FILE}"
        )
    weight = state["fc.weight"].detach().cpu().numpy()
    return _checked(weight, (NUM_CLASSES, POOL3_DIM), path, "fc.weight").T


def read_npz(path: str) -> np.ndarray:
    """W [2048, 1008] from the npz that :func:`convert` writes."""
    with np.load(path) as f:
        if "weight" not in f:
            raise ValueError(f"{path} has no `weight` array: make it with `{CONVERT_COMMAND}`")
        return _checked(f["weight"], (POOL3_DIM, NUM_CLASSES), path, "weight")


def load_classifier(path: str) -> np.ndarray:
    """W [2048, 1008] float32 from a pytorch-fid .pth or a converted .npz."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception Score classifier {path!r} not found: set "
            f"eval.classifier_path to pytorch-fid's {PYTORCH_FID_FILE}"
        )
    return read_npz(path) if path.endswith(".npz") else read_pth(path)


def class_probs(pool3, weight: np.ndarray, block: int = 10_000) -> np.ndarray:
    """p(y | x) = softmax(pool3 @ W) [N, 1008], a block of rows at a time (50,000 features in
    float64 at once would take 800 MB)."""
    return np.concatenate(
        [fid.classifier_probs(pool3[i : i + block], weight) for i in range(0, len(pool3), block)]
    )


def inception_score(pool3, weight: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score of pool3 features over ``splits`` splits."""
    return fid.inception_score(class_probs(pool3, weight), splits)


def convert(pth: str, out: str | None = None) -> str:
    """pytorch-fid .pth -> npz with ``weight`` [2048, 1008] and the source's sha256."""
    out = out or default_path()
    weight = read_pth(pth)
    with open(pth, "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = out + ".partial.npz"  # written whole, then renamed: never a torn file at `out`
    np.savez(
        partial,
        weight=weight,
        source=np.array(os.path.basename(pth)),
        source_sha256=np.array(sha256),
    )
    os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help=f"pytorch-fid's {PYTORCH_FID_FILE}")
    parser.add_argument("--out", help=f"npz to write (default {default_path()})")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.pth, args.out)}")


if __name__ == "__main__":
    main()
