"""CLIP's contrastive objective and its evaluations: zero-shot classification, retrieval recall@k.

All functions are pure jax.numpy (jittable; ``ks`` are static). Embeddings are float ``[N, D]``;
they are L2-normalised inside, so raw projected features (``CLIPModel.get_text_features``) and
already-normalised ones (``CLIPOutput.text_embeds``) give the same results.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jaxgen.errors import DataError


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along ``axis`` (float32); a zero vector stays zero (norm floored at eps)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def clip_logits(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array | float,
                max_scale: float | None = None) -> jax.Array:
    """logits_per_image ``[N_img, N_txt]`` = exp(logit_scale) * cos(image_i, text_j), float32.

    image_embeds: [N_img, D]; text_embeds: [N_txt, D]; logit_scale: scalar, the log of the inverse
    temperature (CLIPModel's ``logit_scale`` parameter, 2.6592 = log(1/0.07) at init).
    max_scale: clip exp(logit_scale) to at most this (the CLIP paper uses 100); None = no clip
    (as transformers' CLIPModel). logits_per_text is the transpose.
    """
    image_embeds, text_embeds = jnp.asarray(image_embeds), jnp.asarray(text_embeds)
    if image_embeds.ndim != 2 or text_embeds.ndim != 2 or image_embeds.shape[1] != text_embeds.shape[1]:
        raise DataError(f"clip_logits: expected image_embeds [N, D] and text_embeds [M, D] with the same "
                        f"D, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}.")
    scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    if max_scale is not None:
        scale = jnp.minimum(scale, max_scale)
    return scale * (l2_normalize(image_embeds) @ l2_normalize(text_embeds).T)


def clip_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array | float,
              max_scale: float | None = None, positives: jax.Array | None = None,
              targets: jax.Array | None = None) -> jax.Array:
    """CLIP's symmetric contrastive loss, a float32 scalar.

    image_embeds, text_embeds: [N, D], row i of each is a matching pair (labels = arange(N)); both
    are L2-normalised inside. logit_scale: scalar log inverse temperature (exp'd here).
    Returns (CE(logits_per_image, arange N) + CE(logits_per_text, arange N)) / 2, mean over the
    batch, equal to transformers' ``CLIPModel(..., return_loss=True).loss`` on the same embeddings.
    positives: None, or bool [N, N] with True where text j fits image i (the diagonal must be
    True): each image's term is then -log of the softmax mass on all its fitting texts, and each
    text's term the same over the images it fits (the multi-positive form; the identity matrix
    gives the loss above).
    targets: None, or float [N, N] non-negative weights of text j for image i (each row and each
    column needs some weight; not with positives): soft targets, each image's term the
    cross-entropy of its row normalised to sum 1 against its softmax over the texts, each text's
    term the same with its column (the identity matrix gives the loss above).
    """
    # float32 whatever the model computed in (bf16 / fp16 training)
    image_embeds, text_embeds = jnp.asarray(image_embeds, jnp.float32), jnp.asarray(text_embeds, jnp.float32)
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise DataError(f"clip_loss: {image_embeds.shape[0]} images but {text_embeds.shape[0]} texts; "
                        "the contrastive loss pairs row i with row i.")
    logits = clip_logits(image_embeds, text_embeds, logit_scale, max_scale)   # [N, N]
    if positives is not None and targets is not None:
        raise DataError("clip_loss: give positives or targets, not both.")
    if targets is not None:
        targets = jnp.asarray(targets, jnp.float32)
        if targets.shape != logits.shape:
            raise DataError(f"clip_loss: targets has shape {tuple(targets.shape)}, expected "
                            f"{tuple(logits.shape)} (images x texts).")
        row = targets / jnp.sum(targets, axis=1, keepdims=True)
        col = targets / jnp.sum(targets, axis=0, keepdims=True)
        per_image = -jnp.sum(row * jax.nn.log_softmax(logits, axis=1), axis=1)
        per_text = -jnp.sum(col * jax.nn.log_softmax(logits, axis=0), axis=0)
    elif positives is None:
        diag = jnp.diagonal(logits)
        per_image = jax.nn.logsumexp(logits, axis=1) - diag     # CE of each image over the texts
        per_text = jax.nn.logsumexp(logits, axis=0) - diag      # CE of each text over the images
    else:
        positives = jnp.asarray(positives, bool)
        if positives.shape != logits.shape:
            raise DataError(f"clip_loss: positives has shape {tuple(positives.shape)}, expected "
                            f"{tuple(logits.shape)} (images x texts).")
        fit = jnp.where(positives, logits, -jnp.inf)
        per_image = jax.nn.logsumexp(logits, axis=1) - jax.nn.logsumexp(fit, axis=1)
        per_text = jax.nn.logsumexp(logits, axis=0) - jax.nn.logsumexp(fit, axis=0)
    return 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))


def zero_shot_classifier(text_embeds: jax.Array) -> jax.Array:
    """Class weights from prompt-template ensembles, as in the CLIP paper.

    text_embeds: [C, T, D] — the text features of C class names, each written with T templates
                 ("a photo of a {}.", ...) — or [C, D] for one template.
    Returns [C, D] float32: each template's feature L2-normalised, averaged over templates, and
    normalised again.
    """
    text_embeds = jnp.asarray(text_embeds)
    if text_embeds.ndim == 2:
        text_embeds = text_embeds[:, None]                      # [C, D] -> [C, 1, D]
    if text_embeds.ndim != 3:
        raise DataError(f"zero_shot_classifier: expected [C, T, D] or [C, D], got "
                        f"{tuple(text_embeds.shape)}.")
    return l2_normalize(jnp.mean(l2_normalize(text_embeds), axis=1))


def zero_shot_logits(image_embeds: jax.Array, classifier: jax.Array,
                     logit_scale: jax.Array | float | None = None) -> jax.Array:
    """Class scores ``[N, C]``: cosine similarity of each image to each class weight (float32).

    image_embeds: [N, D]; classifier: [C, D] from ``zero_shot_classifier``. With logit_scale, the
    scores are multiplied by exp(logit_scale) (softmax-ready). The prediction is argmax over C.
    """
    scores = l2_normalize(image_embeds) @ l2_normalize(classifier).T
    if logit_scale is not None:
        scores = scores * jnp.exp(jnp.asarray(logit_scale, jnp.float32))
    return scores


def recall_at_k(similarity: jax.Array, relevant: jax.Array, ks: Sequence[int] = (1, 5, 10)
                ) -> dict[int, jax.Array]:
    """Retrieval recall@k: the fraction of queries with a relevant target among their top k.

    similarity: [Nq, Nt] scores (higher = closer).
    relevant:   int [Nq] (the one correct target of each query) or bool [Nq, Nt] (every correct
                target; a query counts as found when any of them is in its top k).
    ks:         the cut-offs (static Python ints).
    Ties count in the query's favour: the rank of a query is the number of targets that score
    strictly higher than its best relevant target. Returns {k: float32 scalar in [0, 1]}.
    """
    similarity = jnp.asarray(similarity, jnp.float32)
    relevant = jnp.asarray(relevant)
    nq, nt = similarity.shape
    if relevant.ndim == 1:
        if not jnp.issubdtype(relevant.dtype, jnp.integer) or relevant.shape[0] != nq:
            raise DataError(f"recall_at_k: relevant as indices must be int [{nq}], got "
                            f"{relevant.dtype} {tuple(relevant.shape)}.")
        relevant = jax.nn.one_hot(relevant, nt, dtype=jnp.bool_)           # [Nq] -> [Nq, Nt]
    elif relevant.shape != (nq, nt):
        raise DataError(f"recall_at_k: relevant must be int [{nq}] or bool [{nq}, {nt}], got "
                        f"{tuple(relevant.shape)}.")
    relevant = relevant.astype(bool)
    best = jnp.max(jnp.where(relevant, similarity, -jnp.inf), axis=1)       # [Nq]
    rank = jnp.sum(similarity > best[:, None], axis=1)                       # [Nq], 0 = first
    has_any = jnp.any(relevant, axis=1)
    return {int(k): jnp.mean((rank < k) & has_any) for k in ks}


def retrieval_recall(image_embeds: jax.Array, text_embeds: jax.Array, text_to_image: jax.Array,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, jax.Array]:
    """Image<->text retrieval recall@k in both directions (several captions per image allowed).

    image_embeds: [N_img, D]; text_embeds: [N_txt, D]; text_to_image: int [N_txt], the image each
    caption describes. Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ...} (float32 in
    [0, 1]): an image is found when any of its captions is in its top k.
    """
    text_to_image = jnp.asarray(text_to_image)
    sim = l2_normalize(image_embeds) @ l2_normalize(text_embeds).T            # [N_img, N_txt]
    positives = text_to_image[None, :] == jnp.arange(sim.shape[0])[:, None]  # [N_img, N_txt]
    i2t = recall_at_k(sim, positives, ks)
    t2i = recall_at_k(sim.T, text_to_image, ks)
    return {**{f"image_to_text_R@{k}": v for k, v in i2t.items()},
            **{f"text_to_image_R@{k}": v for k, v in t2i.items()}}
