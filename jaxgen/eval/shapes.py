"""Text-to-image evaluation on the embedded shapes dataset: prompt adherence over its 180 attribute
combinations (the 18 held out of training reported apart), read back by the shapes analyzer, and
the PNGs that show it.

Every function takes what it evaluates as a function or a run, so any text-to-image task (latent
diffusion, ControlNet, video frames, ...) can reuse them:

    sample(num, seed=..., prompts=[num str], **sampling) -> uint8 [num, H, W, 3]     (run.sample)
    reconstruct(images uint8 [N, H, W, 3]) -> uint8 [N, H, W, 3]                   (run.reconstruct)

    prompt_adherence(run.sample, samples_per_prompt=4)        -> (metrics, images)
    text_to_image_report(run.sample, out_dir, 4, grid_prompts, guidance_scales=(2.0, 5.0))
    reconstruction_report(run.reconstruct, test_dataset, out_dir)

Adherence metrics are ``jaxgen.data.shapes.adherence`` dicts: the fraction of images whose shape,
color, size and position (and "all" four) read back as asked, each in [0, 1].
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxgen.eval.images import make_grid, preview_upscale, prompt_grid_png, save_png

EVAL_SEED = 0        # the seed of the adherence samples; the prompt grid uses EVAL_SEED + 1
GRID_PER_PROMPT = 8  # images per prompt in prompt_grid.png
ALL_PROMPTS_COLUMNS = 10  # all_prompts.png: 18 rows (shape x colour) of 10 (size x position)

SampleFn = Callable[..., np.ndarray]


def combination_prompts(combinations) -> list[str]:
    """The canonical caption of each combination index (int [N] in [0, 180)): N str."""
    from jaxgen.data import shapes

    attrs = shapes.combination_attributes(np.asarray(combinations))
    return [shapes.caption(*(int(attrs[a][i]) for a in shapes.ATTRIBUTES)) for i in range(len(attrs["shape"]))]


def default_prompts(num: int) -> list[str]:
    """The 180 canonical captions in combination order, repeated to ``num`` prompts."""
    from jaxgen.data import shapes

    return combination_prompts(np.arange(num) % shapes.NUM_COMBINATIONS)


def prompt_adherence(sample: SampleFn, samples_per_prompt: int, seed: int = EVAL_SEED,
                     **sampling) -> tuple[dict, np.ndarray]:
    """Sample every one of the 180 canonical prompts ``samples_per_prompt`` times with one call
    ``sample(180 * k, seed=seed, prompts=..., **sampling)`` and read the attributes back.

    sampling: passed on (e.g. guidance_scale=5.0, num_steps=, scheduler=).
    Returns ({"all_combinations", "trained_combinations", "heldout_combinations": adherence
    dicts, "num_images": int, "seconds_incl_compile": float}, the images uint8
    [180 * k, H, W, C] in combination-major order).
    """
    from jaxgen.data import shapes

    combos = np.repeat(np.arange(shapes.NUM_COMBINATIONS), int(samples_per_prompt))   # [180 k]
    attrs = shapes.combination_attributes(combos)
    prompts = combination_prompts(combos)
    t0 = time.perf_counter()
    images = sample(len(prompts), seed=seed, prompts=prompts, **sampling)
    seconds = time.perf_counter() - t0
    held = np.isin(combos, np.asarray(shapes.HELDOUT_COMBINATIONS))
    out = {"all_combinations": shapes.adherence(images, attrs),
           "trained_combinations": shapes.adherence(images[~held], {a: v[~held] for a, v in attrs.items()}),
           "heldout_combinations": shapes.adherence(images[held], {a: v[held] for a, v in attrs.items()}),
           "num_images": int(len(images)), "seconds_incl_compile": seconds}
    return out, images


def caption_adherence(prompts: Sequence[str], images: np.ndarray) -> dict:
    """The attributes of ``images`` (uint8 [N, H, W, 3]) read back against their canonical shapes
    captions ``prompts`` (N str; jaxgen.data.shapes.parse_caption, whose DataError names a prompt
    that is not one): {"overall": adherence dict, "per_prompt": {prompt: adherence dict}} over
    the images of each distinct prompt."""
    from jaxgen.data import shapes

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images: pass one prompt per image.")
    parsed = [shapes.parse_caption(p) for p in prompts]
    attrs = {a: np.asarray([q[a] for q in parsed]) for a in shapes.ATTRIBUTES}
    per_prompt = {}
    for p in dict.fromkeys(prompts):
        rows = np.asarray([q == p for q in prompts])
        per_prompt[p] = shapes.adherence(images[rows], {a: v[rows] for a, v in attrs.items()})
    return {"overall": shapes.adherence(images, attrs), "per_prompt": per_prompt}


def format_adherence(report: dict) -> str:
    """caption_adherence's report as a text table: a row per prompt and the overall row."""
    from jaxgen.data import shapes

    cols = (*shapes.ATTRIBUTES, "all")
    width = max(len("overall"), *(len(p) for p in report["per_prompt"]))
    lines = [f"{'prompt':<{width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    rows = [*report["per_prompt"].items(), ("overall", report["overall"])]
    lines += [f"{p:<{width}}  " + "  ".join(f"{r[c]:8.3f}" for c in cols) for p, r in rows]
    return "\n".join(lines)


def reconstruction_report(reconstruct: Callable[[np.ndarray], np.ndarray], dataset,
                          out_dir: str | None = None, prefix: str = "vae_test_") -> dict:
    """An autoencoder on a shapes split: {prefix + "mse": mean squared error on [0, 1] pixels,
    prefix + "reconstruction_adherence": the attributes read back from the reconstructions}.

    dataset: an ArrayDataset with images and the shapes attributes (e.g. the test split).
    out_dir: if given, writes reconstructions.png (16 originals over their reconstructions).
    """
    from jaxgen.data import shapes

    images = dataset.images
    recon = reconstruct(images)
    if out_dir is not None:
        save_png(os.path.join(out_dir, "reconstructions.png"),
                 make_grid(np.concatenate([images[:16], recon[:16]]), ncol=16,
                           upscale=preview_upscale(images.shape[1])))
    return {f"{prefix}mse": float(np.mean((recon / 255.0 - images / 255.0) ** 2)),
            f"{prefix}reconstruction_adherence": shapes.adherence(recon, dataset.attributes)}


def text_to_image_report(sample: SampleFn, out_dir: str, samples_per_prompt: int,
                         grid_prompts: Sequence[str], guidance_scales: Sequence[float] = (),
                         seed: int = EVAL_SEED) -> dict[str, Any]:
    """Prompt adherence with the sampler's defaults, and at each of ``guidance_scales``.

    Returns {"adherence_all_combinations", "adherence_trained_combinations",
    "adherence_heldout_combinations", "adherence_num_images", "adherence_seconds_incl_compile"}
    and, when guidance_scales is not empty, "by_guidance": {"g": {"all_combinations",
    "heldout_combinations"}}. Writes into out_dir all_prompts.png (one sample of every
    combination, in combination order: 18 rows of shape x colour, 10 columns of size x
    position) and prompt_grid.png (GRID_PER_PROMPT samples of each of grid_prompts, labelled,
    seed + 1).
    """
    n = int(samples_per_prompt)
    adherence, images = prompt_adherence(sample, n, seed=seed)
    out: dict[str, Any] = {f"adherence_{k}": v for k, v in adherence.items()}
    save_png(os.path.join(out_dir, "all_prompts.png"),
             make_grid(images[::n], ncol=ALL_PROMPTS_COLUMNS, upscale=preview_upscale(images.shape[1])))
    grid_prompts = list(grid_prompts)
    grid = sample(len(grid_prompts) * GRID_PER_PROMPT, seed=seed + 1,
                  prompts=[p for p in grid_prompts for _ in range(GRID_PER_PROMPT)])
    prompt_grid_png(os.path.join(out_dir, "prompt_grid.png"), grid_prompts, grid, per_prompt=GRID_PER_PROMPT)
    for g in guidance_scales:
        res, _ = prompt_adherence(sample, n, seed=seed, guidance_scale=float(g))
        out.setdefault("by_guidance", {})[f"{float(g):g}"] = {
            k: res[k] for k in ("all_combinations", "heldout_combinations")}
    return out
