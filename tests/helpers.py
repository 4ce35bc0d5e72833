"""Plain helpers shared by the parity tests: error measures, NHWC <-> NCHW layout changes, and
perturbed weights for the save-then-reload direction.

Import them as ``from helpers import rel_err, nchw``: tests/ is no package, and pytest (rootdir
/work/main, the default "prepend" import mode) puts tests/ on sys.path for the test modules and
conftest.py, in the main process and in every pytest-xdist worker alike.
torch is imported only when ``nchw`` is called, so a test file that skips without torch still imports.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with ``devices`` forced host devices, keeping the session's
    flags (conftest.py's compile settings)."""
    return (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()


def _host(x) -> np.ndarray:
    """A numpy / jax array or a torch tensor as a float64 numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().numpy()
    return np.asarray(x, np.float64)


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| over all elements, in float64. Arrays or torch tensors of equal shape."""
    ours, ref = _host(ours), _host(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def rel_errors(ours, ref) -> list[float]:
    """``rel_err`` of each pair of the two sequences (e.g. each step of two sampling trajectories)."""
    return [rel_err(a, b) for a, b in zip(ours, ref)]


def nchw(x):
    """A channels-last array [B, ..., C] (e.g. NHWC) as a torch tensor [B, C, ...] of the same dtype
    (a C-contiguous copy: writable, sharing no memory with ``x``)."""
    import torch

    return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


def nhwc(t) -> np.ndarray:
    """A channels-first torch tensor [B, C, ...] (e.g. NCHW) as a numpy array [B, ..., C]."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def perturbed(params, seed: int):
    """New weights near the old ones: each leaf + 0.05 (std + 0.1) N(0, 1), drawn on the host
    with NumPy (no per-shape compilation). params: a pytree of arrays -> the same of jax arrays."""
    rng = np.random.default_rng(seed)

    def bump(p):
        p = np.asarray(p)
        return jnp.asarray(p + 0.05 * (np.std(p) + 0.1) * rng.standard_normal(p.shape).astype(p.dtype))

    return jax.tree_util.tree_map(bump, params)


def unit_noise(seed: int, shape) -> np.ndarray:
    """Standard normal float32 numpy array of ``shape``, deterministic in ``seed``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def max_err(ours, ref) -> float:
    """max |ours - ref| over all elements, in float64."""
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


def check_images(ours, ref, what: str, tol: float = 1e-3) -> float:
    """Pipeline images [B, H, W, 3] float32 in [0, 1] against diffusers': same shape, a reference
    mostly inside (0, 1) (not clipped flat), max abs difference <= tol. Returns the difference."""
    assert ours.shape == ref.shape and ours.dtype == np.float32, (ours.shape, ref.shape, ours.dtype)
    inside = float(np.mean((ref > 0) & (ref < 1)))
    assert inside > 0.5, f"{what}: reference images mostly clipped ({inside:.2f} inside (0, 1))"
    err = max_err(ours, ref)
    print(f"{what}: max |ours - diffusers| = {err:.2e}")
    assert err <= tol, f"{what}: max abs error {err:.2e} > {tol}"
    return err


SHAPE_CAPTIONS = [f"a {s} {c} {k} {p}" for s in ("small", "large") for c in ("red", "green", "blue")
                  for k in ("circle", "square", "triangle") for p in ("on the left", "at the top")]


def tiny_sd_components(folder, size: int = 16, seed: int = 2) -> dict:
    """The non-U-Net parts of a tiny random diffusers Stable Diffusion pipeline (imports torch,
    diffusers and transformers): a CLIP tokenizer trained on SHAPE_CAPTIONS (written to
    folder/tok), a 2-layer CLIPTextModel of width 32, an AutoencoderKL with factor 2 (latents
    size/2 x size/2 x 4) and DDIM (SD's scaled_linear betas, steps_offset 1). Every weight is
    randomised (randomize_torch). Returns the keyword arguments of diffusers' SD pipelines
    other than unet (safety checker and feature extractor None)."""
    import diffusers
    import transformers

    from jaxgen.convert.testing import randomize_torch
    from jaxgen.tokenizer import train_tokenizer

    tok_dir = os.path.join(os.fspath(folder), "tok")
    tok = train_tokenizer(SHAPE_CAPTIONS * 2, 600, tok_dir)
    text = randomize_torch(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), seed + 1)
    vae = randomize_torch(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=size), seed)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(vae=vae, text_encoder=text, tokenizer=transformers.CLIPTokenizer.from_pretrained(tok_dir),
                scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def shared_tiny_ldm():
    """A finished configs/shapes_ldm.py:tiny run, trained once per test session and shared by the
    xdist workers (the families trained on a frozen base: ControlNet, InstructPix2Pix, upscaler,
    LoRA). It lives beside the session's prepared data ($JAXGEN_DATA_DIR, which conftest.py sets
    before the workers start); a file lock makes one worker train it while the others wait.
    Returns the loaded Run."""
    import fcntl
    import importlib

    from jaxgen.training.run import load_run
    from jaxgen.training.trainer import train

    root = os.path.join(os.path.dirname(os.environ["JAXGEN_DATA_DIR"].rstrip("/")), "shared-tiny-ldm")
    os.makedirs(root, exist_ok=True)
    workdir, done = os.path.join(root, "run"), os.path.join(root, "DONE")
    with open(os.path.join(root, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.isfile(done):
                train(importlib.import_module("configs.shapes_ldm").get_config("tiny"), workdir)
                open(done, "w").close()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return load_run(workdir)
