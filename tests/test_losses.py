"""Losses against independent straightforward implementations (float64, acos, PyWavelets)."""

import math

import numpy as np
import pytest
import pywt
import torch

from crfr.losses import (ArcFace, LossTerms, WaveletSimilarity, arcface_loss, distillation_loss,
                         embedding_match_loss)


def reference_arcface_logits(emb, weight, labels, s, m):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = e @ w.T
    out = s * cos.copy()
    for i, y in enumerate(labels):
        theta = math.acos(np.clip(cos[i, y], -1, 1))
        # insightface: past pi - m the margin logit continues linearly instead of rising again.
        out[i, y] = s * (math.cos(theta + m) if theta + m <= math.pi else cos[i, y] - math.sin(math.pi - m) * m)
    return out, s * cos


def test_arcface_matches_reference():
    torch.manual_seed(0)
    head = ArcFace(8, 5, s=64.0, m=0.5)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    margin, plain = head(emb, labels)
    ref_margin, ref_plain = reference_arcface_logits(
        emb.double().numpy(), head.weight.detach().double().numpy(), labels.numpy(), 64.0, 0.5
    )
    np.testing.assert_allclose(margin.detach().numpy(), ref_margin, atol=1e-3)
    np.testing.assert_allclose(plain.detach().numpy(), ref_plain, atol=1e-3)
    ce = -np.mean([ref_margin[i, y] - np.log(np.exp(ref_margin[i]).sum()) for i, y in enumerate(labels.numpy())])
    assert arcface_loss(margin, labels).item() == pytest.approx(ce, rel=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["theta=0", "theta=pi"])
def test_arcface_is_finite_at_theta_0_and_pi(sign):
    head = ArcFace(4, 3)
    emb = (sign * head.weight.detach()[1:2].clone()).requires_grad_(True)
    margin, _ = head(emb, torch.tensor([1]))
    loss = arcface_loss(margin, torch.tensor([1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_arcface_under_autocast_is_float32_and_finite(dtype):
    torch.manual_seed(0)
    head = ArcFace(16, 10)
    emb = torch.randn(4, 16, requires_grad=True)
    labels = torch.tensor([1, 2, 3, 4])
    with torch.autocast("cpu", dtype=dtype):
        margin, plain = head(emb.to(dtype), labels)
        loss = arcface_loss(margin, labels)
    loss.backward()
    assert margin.dtype == torch.float32 and plain.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    ref_margin, _ = head(emb.detach(), labels)
    torch.testing.assert_close(margin, ref_margin, atol=0.5, rtol=0.02)  # inputs were rounded to half precision


def test_distillation_matches_reference():
    torch.manual_seed(0)
    zt, zs = torch.randn(5, 7) * 10, torch.randn(5, 7) * 10
    t = 4.0
    p = torch.softmax(zt.double() / t, 1).numpy()
    q = torch.softmax(zs.double() / t, 1).numpy()
    expected = t * t * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1))
    assert distillation_loss(zt, zs, t).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(zt, zt, t).item() == pytest.approx(0.0, abs=1e-6)


def test_wavelet_similarity_matches_pywt():
    torch.manual_seed(0)
    teacher = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    student = [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)]
    expected = 0.0
    for t, s in zip(teacher, student):
        lt = pywt.dwt2(t.double().numpy(), "haar", axes=(-2, -1))[0]
        ls = pywt.dwt2(s.double().numpy(), "haar", axes=(-2, -1))[0]
        expected += np.mean((lt - ls) ** 2)
    assert WaveletSimilarity()(teacher, student).item() == pytest.approx(expected, rel=1e-5)


def test_wavelet_similarity_sum_is_equation_3s_squared_norm_per_face():
    torch.manual_seed(0)
    teacher = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    student = [torch.randn(4, 3, 8, 8), torch.randn(4, 5, 4, 4)]
    expected = 0.0
    for t, s in zip(teacher, student):
        lt = pywt.dwt2(t.double().numpy(), "haar", axes=(-2, -1))[0]
        ls = pywt.dwt2(s.double().numpy(), "haar", axes=(-2, -1))[0]
        expected += np.mean(np.sum((lt - ls) ** 2, axis=(1, 2, 3)))  # ||.||_2^2 per face, mean over the batch
    summed = WaveletSimilarity(reduction="sum")(teacher, student).item()
    assert summed == pytest.approx(expected, rel=1e-5)
    # The mean divides each stage by its LL band's size (C * H/2 * W/2): 3*4*4 and 5*2*2 here.
    assert summed > 10 * WaveletSimilarity(reduction="mean")(teacher, student).item()
    with pytest.raises(ValueError, match="mean or sum"):
        WaveletSimilarity(reduction="max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_wavelet_similarity_takes_the_nets_own_filter(reduction):
    # ll_impl reference (pytorch_wavelets) and fast compute the same band, so the loss agrees under both.
    torch.manual_seed(1)
    t, s = [torch.randn(2, 3, 8, 8)], [torch.randn(2, 3, 8, 8)]
    fast = WaveletSimilarity("haar", "zero", "fast", reduction)
    reference = WaveletSimilarity("haar", "zero", "reference", reduction)
    assert (fast.lowpass.impl, reference.lowpass.impl) == ("fast", "reference")
    assert reference(t, s).item() == pytest.approx(fast(t, s).item(), rel=1e-5)


def test_wavelet_similarity_does_not_train_the_teacher():
    t = torch.randn(1, 2, 4, 4, requires_grad=True)
    s = torch.randn(1, 2, 4, 4, requires_grad=True)
    WaveletSimilarity()([t], [s]).backward()
    assert t.grad is None and s.grad is not None


def test_total_is_equation_4():
    terms = LossTerms(arcface=torch.tensor(2.0), distill=torch.tensor(3.0), wavesim=torch.tensor(10.0))
    assert terms.total(1.0, 0.05).item() == pytest.approx(2.0 + 3.0 + 0.5)
    assert LossTerms(arcface=torch.tensor(2.0)).total(1.0, 0.05).item() == pytest.approx(2.0)
    assert terms.items() == {"arcface": 2.0, "distill": 3.0, "wavesim": 10.0}


def test_embedding_match_is_one_minus_cosine_and_joins_the_total_only_with_its_weight():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert embedding_match_loss(t, t * 3).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding_match_loss(t, -t).item() == pytest.approx(2.0)
    assert embedding_match_loss(t, torch.tensor([[0.0, 1.0], [0.0, 5.0]])).item() == pytest.approx(0.5)
    terms = LossTerms(arcface=torch.tensor(2.0), match=torch.tensor(0.5))
    assert terms.total(1.0, 0.05).item() == pytest.approx(2.0)
    assert terms.total(1.0, 0.05, lambda_match=4.0).item() == pytest.approx(4.0)
    # ArcFace's weight: 0 leaves a student learning from the teacher's embeddings alone.
    assert terms.total(1.0, 0.05, lambda_match=4.0, lambda_arcface=0.0).item() == pytest.approx(2.0)


def test_a_student_loss_with_every_weight_zero_is_refused():
    from crfr.config import load_params
    from crfr.errors import ConfigError

    load_params("params.yaml", ["loss.lambda_arcface=0", "loss.lambda1=0", "loss.lambda_match=1"])
    with pytest.raises(ConfigError, match="lambda_arcface, lambda1 and lambda_match are all 0"):
        load_params("params.yaml", ["loss.lambda_arcface=0", "loss.lambda1=0"])


def test_arcface_leaves_unlabelled_faces_out():
    from crfr.data.shards import UNLABELLED

    head = ArcFace(4, 3, s=8.0, m=0.3)
    emb = torch.randn(4, 4)
    labels = torch.tensor([0, UNLABELLED, 2, UNLABELLED])
    margin, plain = head(emb, labels)
    assert torch.equal(margin[[1, 3]], plain[[1, 3]]) and not torch.equal(margin[0], plain[0])
    expected = torch.nn.functional.cross_entropy(margin[[0, 2]], labels[[0, 2]])
    assert arcface_loss(margin, labels).item() == pytest.approx(expected.item())
    none = torch.full((2,), UNLABELLED)
    assert arcface_loss(head(emb[:2], none)[0], none).item() == 0.0
