"""Evaluation of a text-to-video run on moving shapes (``python -m train.eval`` of a video run;
docs/VIDEO.md), and the clip figures (GIF, PNG strip) that train.sample also writes.

Prompts: every colour x shape x direction, 6 x 3 x 5 = 90 ("a red circle moving right", "a green
triangle standing still"; no size), eval.samples_per_prompt clips each, sampled with the run's
defaults. Read back by the shapes analyzer on every frame (``jaxgen.data.shapes.analyze_clips``):

* ``color_per_frame`` / ``shape_per_frame``: the fraction of all frames whose colour / shape is
  the prompt's; ``*_every_frame``: the fraction of clips where it is so on every frame;
* ``direction``: the fraction of clips whose box centre moves from the first to the last frame as
  asked (``shapes.motion_direction``: still below half a training clip's path, else the dominant
  axis), with a per-direction breakdown;
* ``consistent``: the fraction of clips showing a shape on every frame, with the same shape and
  colour on all of them.
Targets (issue 19): colour >= 0.9 and shape >= 0.8 per frame, direction >= 0.8, consistent >= 0.9.
``data_read_back``: the same metrics on generated test clips (the analyzer's own ceiling).
Cost: ``seconds_incl_compile`` for all clips, ``seconds_per_clip`` of one more call of one
sampling batch (compiled already), the process's peak resident memory (resource.getrusage) and,
where the backend reports it, the device's peak bytes in use.
Figures: video_grid.gif (one clip per grid prompt, animated) and video_strip.png (a row per clip,
frames left to right).
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any

import numpy as np

from jaxgen.data import shapes
from jaxgen.eval.images import make_grid, preview_upscale, save_png

EVAL_SEED = 0
GIF_FRAME_MS = 200       # display time of one frame in the GIFs
TARGETS = {"color_per_frame": 0.9, "shape_per_frame": 0.8, "direction": 0.8, "consistent": 0.9}


def motion_prompts() -> tuple[list[str], dict[str, np.ndarray]]:
    """The 90 prompts colour x shape x direction (direction fastest, then shape, then colour) and
    their attribute ids {"shape", "color", "direction": int32 [90]}."""
    color, shape, direction = (a.astype(np.int32).ravel() for a in np.meshgrid(
        np.arange(len(shapes.COLORS)), np.arange(len(shapes.SHAPES)), np.arange(len(shapes.DIRECTIONS)),
        indexing="ij"))
    prompts = [shapes.motion_caption(s, c, d) for s, c, d in zip(shape, color, direction)]
    return prompts, {"shape": shape, "color": color, "direction": direction}


def clip_metrics(clips: np.ndarray, attrs: dict[str, np.ndarray]) -> dict[str, Any]:
    """clips uint8 [N, F, 32, 32, 3] against the asked {"shape", "color", "direction": int [N]}:
    the metrics of the module docstring (floats in [0, 1])."""
    read = shapes.analyze_clips(clips)
    out: dict[str, Any] = {}
    for a in ("color", "shape"):
        right = read[a] == np.asarray(attrs[a])[:, None]                   # [N, F]
        out[f"{a}_per_frame"] = float(right.mean())
        out[f"{a}_every_frame"] = float(right.all(1).mean())
    asked = np.asarray(attrs["direction"])
    right = read["direction"] == asked
    out["direction"] = float(right.mean())
    out["direction_by_asked"] = {name: float(right[asked == d].mean()) for d, name in enumerate(shapes.DIRECTIONS)
                                 if (asked == d).any()}
    out["consistent"] = float(read["consistent"].mean())
    return out


def clip_strip(clips: np.ndarray, upscale: int | None = None) -> np.ndarray:
    """uint8 [N, F, H, W, C] -> one uint8 grid image: a row per clip, its frames left to right."""
    clips = np.asarray(clips)
    n, f = clips.shape[:2]
    up = preview_upscale(clips.shape[2]) if upscale is None else upscale
    return make_grid(clips.reshape((n * f,) + clips.shape[2:]), ncol=f, upscale=up)


def save_gif(path: str, clips: np.ndarray, ncol: int = 8, upscale: int | None = None,
             frame_ms: int = GIF_FRAME_MS) -> str:
    """An animated, looping GIF of clips uint8 [N, F, H, W, 3]: GIF frame k is the grid (ncol
    clips per row) of every clip's frame k. Returns the path."""
    from PIL import Image

    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.dtype != np.uint8:
        raise ValueError(f"save_gif takes uint8 clips [N, F, H, W, C], got {clips.dtype} {clips.shape}")
    up = preview_upscale(clips.shape[2]) if upscale is None else upscale
    grids = [Image.fromarray(make_grid(clips[:, k], ncol=ncol, upscale=up)) for k in range(clips.shape[1])]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grids[0].save(path, save_all=True, append_images=grids[1:], duration=frame_ms, loop=0)
    return path


def save_clips(path: str, clips: np.ndarray, ncol: int = 8) -> str:
    """clips uint8 [N, F, H, W, 3] to ``path``: .gif an animated grid (save_gif), .png a strip
    (clip_strip: a row per clip)."""
    if path.endswith(".gif"):
        return save_gif(path, clips, ncol=ncol)
    if path.endswith(".png"):
        return save_png(path, clip_strip(clips))
    raise ValueError(f"{path}: clips are written as .gif (animated) or .png (a strip).")


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_peak_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats or "peak_bytes_in_use" not in stats else int(stats["peak_bytes_in_use"])


def evaluate(run, out_dir: str, eval_cfg=None) -> dict[str, Any]:
    """The module docstring's metrics for ``run`` (a video run: run.sample -> uint8 clips); writes
    video_grid.gif and video_strip.png into out_dir."""
    k = int(eval_cfg.samples_per_prompt) if eval_cfg is not None else 4
    os.makedirs(out_dir, exist_ok=True)
    prompts, attrs = motion_prompts()
    asked = {a: np.repeat(v, k) for a, v in attrs.items()}
    every = [p for p in prompts for _ in range(k)]                          # prompt-major
    rss_before = _peak_rss_mib()
    t0 = time.perf_counter()
    clips = run.sample(len(every), seed=EVAL_SEED, prompts=every)           # [90 k, F, H, W, 3]
    seconds = time.perf_counter() - t0
    batch = min(run.task.sampling_batch_size, len(every))
    t1 = time.perf_counter()
    run.sample(batch, seed=EVAL_SEED + 1, prompts=every[:batch])            # same shapes: no compile
    per_clip = (time.perf_counter() - t1) / batch
    f = clips.shape[1]
    data = shapes.moving_clips(len(prompts), EVAL_SEED, f, split="test")
    out: dict[str, Any] = {
        "prompts": len(prompts), "samples_per_prompt": k, "num_frames": int(f),
        "samples": clip_metrics(clips, asked),
        "data_read_back": clip_metrics(data["frames"], data),
        "cost": {"seconds_incl_compile": seconds, "seconds_per_clip": per_clip, "sampling_batch": batch,
                 "peak_rss_mib": _peak_rss_mib(), "peak_rss_mib_before_sampling": rss_before,
                 "device_peak_bytes": _device_peak_bytes()},
    }
    for name, target in TARGETS.items():
        out[f"target_{name}_{target}_met"] = bool(out["samples"][name] >= target)
    # figures: 15 prompts spread over colours, shapes and directions, the first clip of each
    grid_idx = np.arange(len(prompts))[::6][:15] * k                        # first sample of every 6th prompt
    save_gif(os.path.join(out_dir, "video_grid.gif"), clips[grid_idx], ncol=5)
    save_png(os.path.join(out_dir, "video_strip.png"), clip_strip(clips[grid_idx[:10]]))
    out["grid_prompts"] = [every[i] for i in grid_idx]
    return out
