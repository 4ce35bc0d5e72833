"""CLIP's contrastive loss, zero-shot classifier and retrieval recall (jaxgen.clip_utils)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.clip_utils import (clip_logits, clip_loss, l2_normalize, recall_at_k, retrieval_recall,
                               zero_shot_classifier, zero_shot_logits)
from jaxgen.errors import DataError


def test_clip_loss_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(0)
    image, text = rng.randn(6, 5).astype(np.float32) * 3, rng.randn(6, 5).astype(np.float32)
    scale = 2.6592
    ours = float(clip_loss(image, text, scale))
    # transformers' CLIPModel loss: logits_per_text = exp(s) * t_n @ i_n.T, mean of both CEs
    i_n = torch.nn.functional.normalize(torch.from_numpy(image), dim=-1)
    t_n = torch.nn.functional.normalize(torch.from_numpy(text), dim=-1)
    logits_per_text = t_n @ i_n.T * np.exp(scale)
    labels = torch.arange(6)
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits_per_text, labels)
                 + torch.nn.functional.cross_entropy(logits_per_text.T, labels))
    assert ours == pytest.approx(float(ref), rel=1e-6)
    np.testing.assert_allclose(clip_logits(image, text, scale), logits_per_text.T.numpy(), rtol=1e-5)


def test_clip_loss_properties():
    rng = np.random.RandomState(1)
    x = rng.randn(4, 8).astype(np.float32)
    # inputs are normalised inside: positive rescaling changes nothing
    assert float(clip_loss(x * 5, x * 0.1, 1.0)) == pytest.approx(float(clip_loss(x, x, 1.0)), rel=1e-6)
    # orthogonal matching pairs at a large scale: loss -> 0; chance level is log(N) at scale 0
    eye = np.eye(4, 8, dtype=np.float32)
    assert float(clip_loss(eye, eye, np.log(100.0))) < 1e-3
    assert float(clip_loss(x, rng.randn(4, 8), -30.0)) == pytest.approx(np.log(4), rel=1e-4)
    # max_scale clips exp(logit_scale)
    assert float(clip_loss(eye, eye, 10.0, max_scale=1.0)) == pytest.approx(float(clip_loss(eye, eye, 0.0)))
    # jittable and differentiable in all arguments
    grads = jax.jit(jax.grad(clip_loss, argnums=(0, 1, 2)))(x, x[::-1], jnp.float32(2.0))
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    with pytest.raises(DataError, match="pairs row i"):
        clip_loss(x, x[:3], 1.0)


def test_clip_loss_with_several_positives():
    """positives: -log of the softmax mass on every fitting text (and image), by hand in numpy."""
    rng = np.random.RandomState(2)
    img, txt = rng.randn(4, 8).astype(np.float32), rng.randn(4, 8).astype(np.float32)
    eye = np.eye(4, dtype=bool)
    assert float(clip_loss(img, txt, 1.0, positives=eye)) == pytest.approx(float(clip_loss(img, txt, 1.0)), rel=1e-6)
    pos = eye.copy()
    pos[0, 2] = pos[3, 1] = True            # text 2 also fits image 0, text 1 also fits image 3
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    logits = np.exp(1.5) * n(img) @ n(txt).T
    soft_i = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    soft_t = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    want = 0.5 * (np.mean(-np.log((soft_i * pos).sum(1))) + np.mean(-np.log((soft_t * pos).sum(0))))
    assert float(clip_loss(img, txt, 1.5, positives=pos)) == pytest.approx(want, rel=1e-5)
    assert float(clip_loss(img, txt, 1.5, positives=pos)) < float(clip_loss(img, txt, 1.5))
    with pytest.raises(DataError, match="positives has shape"):
        clip_loss(img, txt, 1.0, positives=eye[:3])


def test_clip_loss_with_soft_targets():
    """targets: cross-entropy of each row (image) and column (text), normalised, by hand in numpy."""
    rng = np.random.RandomState(3)
    img, txt = rng.randn(5, 8).astype(np.float32), rng.randn(5, 8).astype(np.float32)
    eye = np.eye(5, dtype=np.float32)
    assert float(clip_loss(img, txt, 1.0, targets=eye * 3)) == pytest.approx(float(clip_loss(img, txt, 1.0)),
                                                                            rel=1e-6)
    w = rng.uniform(0.0, 1.0, (5, 5)).astype(np.float32) + eye
    n = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    logits = np.exp(0.7) * n(img) @ n(txt).T
    log_i = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_t = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    want = 0.5 * (np.mean(-(w / w.sum(1, keepdims=True) * log_i).sum(1))
                  + np.mean(-(w / w.sum(0, keepdims=True) * log_t).sum(0)))
    assert float(clip_loss(img, txt, 0.7, targets=w)) == pytest.approx(want, rel=1e-5)
    grads = jax.jit(jax.grad(lambda a, b: clip_loss(a, b, 0.7, targets=w), argnums=(0, 1)))(img, txt)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    with pytest.raises(DataError, match="targets has shape"):
        clip_loss(img, txt, 1.0, targets=w[:3])
    with pytest.raises(DataError, match="not both"):
        clip_loss(img, txt, 1.0, targets=w, positives=eye > 0)


def test_zero_shot_classifier_and_logits():
    rng = np.random.RandomState(2)
    classes = l2_normalize(rng.randn(3, 16))                        # [C, D]
    templates = classes[:, None, :] + 0.3 * rng.randn(3, 5, 16)     # [C, T, D] noisy prompts
    weights = zero_shot_classifier(templates)
    assert weights.shape == (3, 16)
    np.testing.assert_allclose(jnp.linalg.norm(weights, axis=-1), 1.0, rtol=1e-6)
    expect = l2_normalize(jnp.mean(l2_normalize(templates), axis=1))
    np.testing.assert_allclose(weights, expect, rtol=1e-6)
    np.testing.assert_allclose(zero_shot_classifier(templates[:, 0]), l2_normalize(templates[:, 0]),
                               rtol=1e-6)
    images = classes[np.array([2, 0, 1, 1])] + 0.1 * rng.randn(4, 16)
    scores = zero_shot_logits(images, weights)
    assert scores.shape == (4, 3) and np.argmax(scores, axis=1).tolist() == [2, 0, 1, 1]
    np.testing.assert_allclose(zero_shot_logits(images, weights, 1.0), scores * np.e, rtol=1e-6)
    with pytest.raises(DataError):
        zero_shot_classifier(np.zeros((2, 3, 4, 5)))


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.0, 0.2],     # query 0: target 0 first
                    [0.5, 0.4, 0.3, 0.6],     # query 1: target 1 third
                    [0.2, 0.2, 0.2, 0.2]])    # query 2: all tied -> counted as first
    r = recall_at_k(sim, np.array([0, 1, 3]), ks=(1, 2, 3))
    assert [float(r[k]) for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])
    relevant = np.zeros((3, 4), bool)
    relevant[1, [1, 3]] = True                # query 1 has two correct targets, one ranked first
    assert float(recall_at_k(sim, relevant, ks=(1,))[1]) == pytest.approx(1 / 3)
    with pytest.raises(DataError):
        recall_at_k(sim, np.zeros((3, 3), bool))


def test_retrieval_recall_two_captions_per_image():
    rng = np.random.RandomState(3)
    images = l2_normalize(rng.randn(4, 32))
    text_to_image = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    texts = images[text_to_image] + 0.05 * rng.randn(8, 32)
    texts = texts.at[7].set(-images[3])              # caption 7 describes image 3 badly
    r = jax.jit(retrieval_recall, static_argnames="ks")(images, texts, text_to_image, ks=(1, 4))
    assert float(r["image_to_text_R@1"]) == 1.0      # each image still has a good caption
    assert float(r["text_to_image_R@1"]) == pytest.approx(7 / 8)
    assert float(r["text_to_image_R@4"]) == 1.0
