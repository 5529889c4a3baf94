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
    labels[0, :2, :2] = 255                  # patch (0, 0) of image 0 unlabelled: left out entirely
    labels[1, 0, 0] = 255                    # one unlabelled pixel
    wd = 1e-3
    info = {}
    W, b = probe.fit_probe(feats, labels, C, wd, info=info)
    assert info["grad_norm"] < 1e-5 and 0 < info["lbfgs_iterations"] <= 300
    # the objective is fitted on standardised features (mean 0, std 1 per dimension, over the
    # patches with labels); undo the folding by hand and check that its gradient there (by
    # autograd, independently) is ~0
    q, count = probe.patch_class_fractions(labels, (h, w), C)
    keep = count.reshape(-1) > 0
    assert int(keep.sum()) == n * h * w - 1
    X = feats.reshape(-1, E).double()[keep]
    mean, std = X.mean(0), X.std(0)
    W_std = (W.double() * std).requires_grad_()
    b_std = (b.double() + W.double() @ mean).requires_grad_()
    loss = probe.probe_loss(W_std, b_std, (X - mean) / std, q.reshape(-1, C)[keep], count.reshape(-1)[keep], wd)
    loss.backward()
    assert W_std.grad.abs().max() < 1e-5 and b_std.grad.abs().max() < 1e-5
    # separable features: every patch right; bilinear upsampling blends neighbouring patches'
    # logits near their borders, so pixels can only be checked loosely
    assert torch.equal((feats @ W.T + b).argmax(-1), patch_labels)
    pred = probe.probe_predict(feats, W, b, labels.shape[-2:])
    assert (pred == labels).float().mean() > 0.9
    assert probe.score(patch_labels, patch_labels, C, background_index=0)["miou"] == 100.0


def test_choose_wd_fits_on_80_percent_and_scores_the_other_20(monkeypatch):
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(10, 2, 2, 4, generator=g)
    labels = torch.randint(0, 3, (10, 4, 4), generator=g)
    wd, scores = probe.choose_wd(feats, labels, 3, background_index=0, grid=(1e-4, 1e-2))
    for v in (1e-4, 1e-2):                                   # recomputed by hand from the parts
        W, b = probe.fit_probe(feats[:8], labels[:8], 3, v)
        pred = probe.probe_predict(feats[8:], W, b, (4, 4))
        assert scores[v] == probe.score(pred, labels[8:], 3, 0)["miou"]
    assert scores[wd] == max(scores.values())
    # ties go to the larger (safer) wd
    monkeypatch.setattr(probe, "score", lambda *a, **k: {"miou": 50.0})
    assert probe.choose_wd(feats, labels, 3, 0, grid=(1e-4, 1e-2))[0] == 1e-2


def test_cli_fits_on_tune_and_scores_val(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = CLIPConfig(image_size=32, patch_size=8, stem="linear", vision_width=32, vision_layers=1,
                     vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": CLIP(cfg).state_dict(), "model_config": dataclasses.asdict(cfg)}, path)
    # which split's features reach the fit, and which are scored
    source, fitted, predicted = {}, [], []
    real_extract, real_fit, real_predict = probe.extract_features, probe.fit_probe, probe.probe_predict

    def extract(model, ds, *a, **k):
        f, y = real_extract(model, ds, *a, **k)
        source[id(f)] = ds.name
        return f, y
    monkeypatch.setattr(probe, "extract_features", extract)
    monkeypatch.setattr(probe, "fit_probe", lambda f, *a, **k: fitted.append(source[id(f)]) or real_fit(f, *a, **k))
    monkeypatch.setattr(probe, "probe_predict", lambda f, *a, **k: predicted.append(source[id(f)]) or real_predict(f, *a, **k))
    results = probe.main(["--ckpt", str(path), "--max_images", "10", "--wd", "1e-3"])
    assert fitted == ["shapes-tune"] and predicted == ["shapes-val"]
    r = json.loads((tmp_path / "probe_naive_tune-val_wd0.001_n10.json").read_text())
    assert r["miou"] == results[str(path)]["miou"] and r["num_fit"] == 10 and r["num_eval"] == 10
    assert r["class_names"][0] == "background" and len(r["iou"]) == 9 and r["wd"] == 1e-3
    for bad in (["--ckpt", str(tmp_path / "missing.pt")], ["--ckpt", str(tmp_path)],
                ["--ckpt", str(path), "--eval_split", "tune"], ["--ckpt", str(path), "--wd", "-1"],
                ["--ckpt", str(path), "--max_images", "0"]):
        with pytest.raises(SystemExit):
            probe.main(bad)
