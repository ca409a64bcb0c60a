"""The Inception Score classifier (cm_jax.evaluation.classifier), read from fake pytorch-fid
state dicts: the real 95 MB pt_inception file cannot be had offline."""

import sys

import numpy as np
import pytest
from scipy import special

from cm_jax.evaluation import classifier, fid

torch = pytest.importorskip("torch", reason="torch (CPU) writes the fake pytorch-fid files")


def write_fake_pytorch_fid(path, num_classes=1008, with_fc=True):
    """A state dict shaped like pytorch-fid's pt_inception-2015-12-05: the classifier `fc` among
    unrelated layers; its torch tensors, as numpy."""
    g = torch.Generator().manual_seed(0)
    state = {
        "Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3, generator=g),
        "Mixed_7c.branch_pool.bn.running_mean": torch.randn(192, generator=g),
    }
    if with_fc:
        state["fc.weight"] = torch.randn(num_classes, 2048, generator=g) * 0.2
        state["fc.bias"] = torch.randn(num_classes, generator=g)
    torch.save(state, path)
    return {k: v.numpy() for k, v in state.items()}


def test_reads_the_transposed_fc_weight_and_scores_without_the_bias(tmp_path):
    state = write_fake_pytorch_fid(tmp_path / "pt_inception.pth")
    weight = classifier.load_classifier(str(tmp_path / "pt_inception.pth"))
    assert weight.shape == (2048, 1008) and weight.dtype == np.float32
    np.testing.assert_array_equal(weight, state["fc.weight"].T)
    pool3 = np.random.default_rng(0).random((30, 2048)).astype(np.float32)
    by_hand = special.softmax(
        pool3.astype(np.float64) @ state["fc.weight"].T.astype(np.float64), axis=1
    )
    np.testing.assert_allclose(classifier.class_probs(pool3, weight, block=7), by_hand, rtol=1e-10)
    score = classifier.inception_score(pool3, weight)
    assert score == pytest.approx(fid.inception_score(by_hand, 10), rel=1e-10)
    # The graph's biased softmax:0 differs clearly, so the checks above see a bias added.
    biased = special.softmax(pool3 @ state["fc.weight"].T + state["fc.bias"], axis=1)
    assert np.abs(biased - by_hand).max() > 0.1


def test_converted_npz_holds_the_same_weight(tmp_path):
    write_fake_pytorch_fid(tmp_path / "pt_inception.pth")
    out = tmp_path / "classifier.npz"
    classifier.main(["--pth", str(tmp_path / "pt_inception.pth"), "--out", str(out)])
    np.testing.assert_array_equal(
        classifier.load_classifier(str(out)),
        classifier.load_classifier(str(tmp_path / "pt_inception.pth")),
    )
    with np.load(out) as f:
        assert str(f["source"]) == "pt_inception.pth" and len(str(f["source_sha256"])) == 64


def test_wrong_files_are_clear_errors(tmp_path):
    write_fake_pytorch_fid(tmp_path / "torchvision.pth", num_classes=1000)
    with pytest.raises(
        ValueError,
        match=r"fc.weight in .*torchvision.pth has shape "
        r"\(1000, 2048\), expected \(1008, 2048\)",
    ):
        classifier.load_classifier(str(tmp_path / "torchvision.pth"))
    write_fake_pytorch_fid(tmp_path / "no_fc.pth", with_fc=False)
    with pytest.raises(ValueError, match="no_fc.pth has no fc.weight"):
        classifier.load_classifier(str(tmp_path / "no_fc.pth"))
    np.savez(tmp_path / "transposed.npz", weight=np.zeros((1008, 2048), np.float32))
    with pytest.raises(ValueError, match=r"transposed.npz has shape \(1008, 2048\)"):
        classifier.load_classifier(str(tmp_path / "transposed.npz"))
    with pytest.raises(FileNotFoundError, match=classifier.PYTORCH_FID_FILE):
        classifier.load_classifier(str(tmp_path / "absent.pth"))


def test_pth_without_torch_says_how_to_do_without(tmp_path, monkeypatch):
    write_fake_pytorch_fid(tmp_path / "pt_inception.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs torch.*cm_jax.evaluation.classifier --pth"):
        classifier.load_classifier(str(tmp_path / "pt_inception.pth"))
