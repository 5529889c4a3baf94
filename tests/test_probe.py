"""Tests for probe.py (dense linear probe), each against an independent computation."""

import dataclasses
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402
from clip import CLIP, CLIPConfig  # noqa: E402


def test_patch_class_fractions_by_hand():
    labels = torch.tensor([[[0, 0, 1, 2],
                            [0, 255, 1, 1],
                            [3, 3, 255, 255],
                            [3, 0, 255, 255]]])                  # [1, 4, 4], 2x2 patches
    q, count = probe.patch_class_fractions(labels, (2, 2), num_classes=4)
    assert count.tolist() == [[[3, 4], [4, 0]]]
    assert q[0, 0, 0].tolist() == [1, 0, 0, 0]                    # three 0s (one pixel ignored)
    assert q[0, 0, 1].tolist() == [0, 0.75, 0.25, 0]
    assert q[0, 1, 0].tolist() == [0.25, 0, 0, 0.75]
    assert q[0, 1, 1].tolist() == [0, 0, 0, 0]                    # nothing labelled
    with pytest.raises(ValueError, match="labels must be in"):
        probe.patch_class_fractions(labels, (2, 2), num_classes=3)
    with pytest.raises(ValueError, match="tile"):
        probe.patch_class_fractions(labels, (3, 3), num_classes=4)


def test_probe_loss_is_the_mean_pixel_cross_entropy():
    """The soft-label patch form equals a loop over pixels, each scored with its patch's logits."""
    g = torch.Generator().manual_seed(0)
    n, h, w, E, C, p = 2, 3, 2, 5, 4, 3
    feats = torch.randn(n, h, w, E, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n, h * p, w * p), generator=g)
    labels[0, :2, :2] = 255
    weight = torch.randn(C, E, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64)
    q, count = probe.patch_class_fractions(labels, (h, w), C)
    wd = 0.01
    got = probe.probe_loss(weight, bias, feats.reshape(-1, E), q.reshape(-1, C), count.reshape(-1), wd)
    total, pixels = 0.0, 0
    for i in range(n):
        for y in range(h * p):
            for x in range(w * p):
                if labels[i, y, x] == 255:
                    continue
                logits = (weight @ feats[i, y // p, x // p] + bias).tolist()
                lse = math.log(sum(math.exp(v) for v in logits))
                total += lse - logits[labels[i, y, x]]
                pixels += 1
    want = total / pixels + wd * float((weight ** 2).sum())
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_fit_reaches_the_optimum_and_separable_features_segment_perfectly():
    # features that encode the class of a patch along a class direction, plus noise
    g = torch.Generator().manual_seed(1)
    n, h, w, C, E, p = 6, 4, 4, 3, 8, 2
    patch_labels = torch.randint(0, C, (n, h, w), generator=g)
    directions = torch.nn.functional.normalize(torch.randn(C, E, generator=g), dim=-1)
    feats = directions[patch_labels] + 0.05 * torch.randn(n, h, w, E, generator=g)
    labels = patch_labels.repeat_interleave(p, 1).repeat_interleave(p, 2)          # [n, 8, 8]
    wd = 1e-3
    W, b = probe.fit_probe(feats, labels, C, wd)
    # the objective is fitted on standardised features (mean 0, std 1 per dimension); undo the
    # folding by hand and check that its gradient there (by autograd, independently) is ~0
    X = feats.reshape(-1, E).double()
    mean, std = X.mean(0), X.std(0)
    q, count = probe.patch_class_fractions(labels, (h, w), C)
    W_std = (W.double() * std).requires_grad_()
    b_std = (b.double() + W.double() @ mean).requires_grad_()
    loss = probe.probe_loss(W_std, b_std, (X - mean) / std, q.reshape(-1, C), count.reshape(-1), wd)
    loss.backward()
    assert W_std.grad.abs().max() < 1e-5 and b_std.grad.abs().max() < 1e-5
    # separable features: every patch right; bilinear upsampling blends neighbouring patches'
    # logits near their borders, so pixels can only be checked loosely
    assert torch.equal((feats @ W.T + b).argmax(-1), patch_labels)
    pred = probe.probe_predict(feats, W, b, labels.shape[-2:])
    assert (pred == labels).float().mean() > 0.9
    assert probe.score(patch_labels, patch_labels, C, background_index=0)["miou"] == 100.0


def test_choose_wd_uses_only_the_fit_images_given(monkeypatch):
    seen = []
    real_fit = probe.fit_probe

    def spy(feats, labels, num_classes, wd, max_iter=300):
        seen.append(feats.shape[0])
        return real_fit(feats, labels, num_classes, wd, max_iter)
    monkeypatch.setattr(probe, "fit_probe", spy)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 2, 2, 4, generator=g)
    labels = torch.randint(0, 3, (10, 4, 4), generator=g)
    wd, scores = probe.choose_wd(feats, labels, 3, background_index=0, grid=(1e-4, 1e-2))
    assert seen == [8, 8]                                   # fitted on 80%, scored on the other 20%
    assert wd in (1e-4, 1e-2) and scores[wd] == max(scores.values())


def test_cli_on_a_tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPConfig(image_size=32, patch_size=8, stem="linear", vision_width=32, vision_layers=1,
                     vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, path)
    results = probe.main(["--ckpt", str(path), "--max_images", "10", "--wd", "1e-4"])
    r = json.loads((tmp_path / "probe_naive.json").read_text())
    assert r["miou"] == results[str(path)]["miou"] and r["num_fit"] == 10 and r["num_eval"] == 10
    assert r["class_names"][0] == "background" and len(r["iou"]) == 9
    with pytest.raises(SystemExit):
        probe.main(["--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        probe.main(["--ckpt", str(path), "--eval_split", "tune"])
