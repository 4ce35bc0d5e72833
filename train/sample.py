"""python -m train.sample --workdir DIR --num N --out FILE(.png|.npz|.gif) [--labels ...] [--prompt TEXT]
                         [--per_prompt K] [--steps S] [--guidance G] [--scheduler CLASSNAME] [--seed S]

Generates N images from a generative run (uint8 NHWC): a PNG grid, or an .npz with
``images`` (and ``labels`` / ``prompts`` when given). For an autoencoder run, decodes N random
codes drawn from the spread of the test set's codes. --prompt may be repeated; with --per_prompt K
each prompt gets K images (--num is then K * prompts) and a .png is one labelled row per prompt.

--control FILE.png (repeatable: one for all images, or one per image) gives a ControlNet run
(configs/shapes_controlnet.py) its control images, e.g. a white-on-black mask.

--image FILE.png (repeatable) with --prompt: an image-editing run (configs/shapes_ip2p.py:
run.edit, --prompt the instruction) or an upscaling run (configs/shapes_upscale.py: run.upscale)
takes its input images from the files; one output per --image (one --prompt for all, or one each).

A video run (configs/shapes_video.py) samples N clips: --out x.gif writes an animated GIF (a grid of
the clips, one GIF frame per clip frame), x.png a strip (a row per clip, frames left to right),
x.npz the uint8 clips [N, F, H, W, 3] as ``images``.

--attention-maps FILE.png (a text-to-image run or a diffusers folder, with --prompt) also writes each
distinct prompt's per-token cross-attention maps, averaged over heads, layers and steps, as
overlays on its image (jaxgen/pipelines/prompt_to_prompt.py).

--adherence (with shapes captions as --prompt, e.g. "a large red circle on the left") reads every
image's colour, shape, size and position back with the shapes analyzer and prints, per prompt and
overall, the fraction that follows its prompt (what ``make demo`` reports at its end).

--workdir may also be a diffusers Stable Diffusion folder (it holds model_index.json): then
jaxgen.StableDiffusionPipeline generates one image per prompt (--prompt is required; one prompt
is repeated N times), with --steps (default 50), --guidance (default 7.5), --scheduler (a
diffusers class name built from the folder's scheduler config) and --seed.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from train import common

flags.DEFINE_string("workdir", None, "run directory")
flags.DEFINE_integer("num", 16, "number of images", lower_bound=1)
flags.DEFINE_string("out", None, "output file: .png (grid) or .npz; .gif for a video run's clips")
flags.DEFINE_list("labels", None, "class labels, one per image or one for all")
flags.DEFINE_multi_string("prompt", None, "text prompt(s), one per image or one for all")
flags.DEFINE_integer("per_prompt", 0, "images per --prompt (then --num is ignored); with a .png --out, "
                     "one labelled row per prompt", lower_bound=0)
flags.DEFINE_integer("steps", None, "sampling steps (default: the config's)", lower_bound=1)
flags.DEFINE_float("guidance", None, "classifier-free guidance scale (default: the config's)")
flags.DEFINE_string("scheduler", None, "scheduler class name, e.g. DDIMScheduler (default: the config's)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_multi_string("control", None, "control image file(s) (PNG) for a ControlNet run: one for "
                          "all images, or one per image")
flags.DEFINE_multi_string("image", None, "input image file(s) (PNG) of an editing or upscaling run")
flags.DEFINE_integer("step", None, "checkpoint step (default: the newest intact one)", lower_bound=0)
flags.DEFINE_string("attention-maps", None, "also write per-token cross-attention map overlays (PNG) for each "
                    "--prompt (text-to-image runs and diffusers folders)")
flags.DEFINE_boolean("adherence", False, "read the images' shapes attributes back against their --prompt "
                     "(canonical shapes captions) and print the fraction that follows each prompt")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    if not F.out.endswith((".png", ".npz", ".gif")):
        raise app.UsageError(f"--out={F.out}: the file must end in .png (a grid) or .npz (arrays), or .gif "
                             "(a video run's clips, animated)")
    if F.per_prompt:
        if not F.prompt:
            raise app.UsageError("--per_prompt K takes K >= 1 images for each --prompt; pass --prompt")
        F.num = F.per_prompt * len(F.prompt)
    labels = _labels(F)                      # checked before anything loads
    if F.adherence:
        _check_adherence_prompts(F)
    if F["attention-maps"].value and (not F.prompt or not F["attention-maps"].value.endswith(".png")):
        raise app.UsageError("--attention-maps FILE.png takes the maps of each --prompt: pass --prompt and a .png")
    common.setup_logging()
    common.init_distributed()
    import jaxgen
    from jaxgen.errors import JaxgenError

    if os.path.isfile(os.path.join(F.workdir, "model_index.json")):
        images, prompts = _pipeline_sample(F)
        _save(F, images, None, prompts)
        _attention_maps(F, F.workdir)
        _adherence(F, images, prompts)
        return
    run = jaxgen.load_run(F.workdir, step=F.step)
    prompts = _prompts(F) if F.prompt else None
    if F.image:
        images, prompts = _from_images(F, run)
        _save(F, images, None, prompts)
        return
    if "sample" in run.abilities:
        options = {"control": read_images(F.control, "--control")} if F.control else {}
        images = run.sample(F.num, seed=F.seed, labels=labels, prompts=prompts, num_steps=F.steps,
                            guidance_scale=F.guidance, scheduler=F.scheduler, **options)
    elif "decode_random_codes" in run.abilities:
        unused = [f"--{name}" for name in ("labels", "prompt", "steps", "guidance", "scheduler")
                  if F[name].value is not None]
        if unused:
            raise app.UsageError(f"a {run.task.name!r} run decodes random codes: {', '.join(unused)} "
                                 "do not apply to it (only --num, --seed, --step and --out do); drop them.")
        images = run.decode_random_codes(F.num, seed=F.seed)
    else:
        raise JaxgenError(f"a {run.task.name!r} run does not generate images; it offers "
                          f"{', '.join(run.abilities) or 'no methods'}.")
    _save(F, images, labels, prompts)
    _attention_maps(F, run)
    _adherence(F, images, prompts)


def _check_adherence_prompts(F):
    """--adherence needs --prompt, each a canonical shapes caption: a UsageError naming the first
    that is not, before anything loads or samples."""
    from jaxgen.data.shapes import parse_caption
    from jaxgen.errors import DataError

    if not F.prompt:
        raise app.UsageError("--adherence reads the images back against their prompts: pass --prompt "
                             "(shapes captions such as 'a large red circle on the left')")
    for p in F.prompt:
        try:
            parse_caption(p)
        except DataError as e:
            raise app.UsageError(f"--adherence: {e}") from None


def _adherence(F, images, prompts):
    """--adherence: print the fraction of images that follow their prompt, per prompt and overall."""
    if not F.adherence:
        return
    from jaxgen.eval.shapes import caption_adherence, format_adherence

    if images.ndim != 4:
        raise app.UsageError("--adherence reads still images; this run makes clips.")
    print("prompt adherence (the shapes analyzer reads each image back):")
    print(format_adherence(caption_adherence(prompts, images)))


def _attention_maps(F, source):
    """--attention-maps: the maps of each distinct --prompt with the run or folder ``source``."""
    if not F["attention-maps"].value:
        return
    from jaxgen.pipelines.prompt_to_prompt import write_attention_maps

    prompts = list(dict.fromkeys(F.prompt))
    write_attention_maps(source, prompts, F["attention-maps"].value, seed=F.seed, num_inference_steps=F.steps,
                         guidance_scale=F.guidance, scheduler=F.scheduler)
    print(f"wrote the attention maps of {len(prompts)} prompt(s) to {F['attention-maps'].value}")


def _from_images(F, run):
    """run.edit / run.upscale of the --image files with the --prompt(s) -> (uint8 images, prompts)."""
    ability = next((a for a in ("edit", "upscale") if a in run.abilities), None)
    if ability is None:
        raise app.UsageError(f"--image: a {run.task.name!r} run takes no input images (it offers "
                             f"{', '.join(run.abilities)}); drop --image.")
    if not F.prompt:
        raise app.UsageError(f"--image with a run that can {ability}: pass --prompt (the instruction or description)")
    inputs = read_images(F.image, "--image")
    prompts = list(F.prompt)
    if len(prompts) == 1:
        prompts *= len(inputs)
    if len(prompts) != len(inputs):
        raise app.UsageError(f"{len(F.prompt)} --prompt for {len(inputs)} --image: pass one, or one per image")
    images = getattr(run, ability)(inputs, prompts, seed=F.seed, num_steps=F.steps, guidance_scale=F.guidance)
    F.num = len(images)
    return images, prompts


def read_images(paths, flag: str) -> np.ndarray:
    """Image files -> uint8 [N, H, W, C] (C = 1 for grey files, else 3); a UsageError naming the
    file that is missing or of another size."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        try:
            with Image.open(path) as im:
                out.append(np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")))
        except (OSError, UnidentifiedImageError) as e:
            raise app.UsageError(f"{flag} {path}: cannot read it as an image ({e}).") from None
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise app.UsageError(f"{flag} images have different sizes {sorted(shapes)}; give images of one size.")
    images = np.stack(out)
    return images[..., None] if images.ndim == 3 else images


def _labels(F) -> np.ndarray | None:
    """--labels as int32 [num] (one label repeats), or None; a UsageError for non-integers."""
    if not F.labels:
        return None
    try:
        labels = np.asarray([int(v) for v in F.labels], np.int32)
    except ValueError:
        raise app.UsageError(f"--labels={','.join(F.labels)}: give integer class ids, e.g. --labels=3 "
                             "or --labels=0,1,2") from None
    if len(labels) not in (1, F.num):
        raise app.UsageError(f"{len(labels)} --labels for --num={F.num}: give one label, or one per image")
    return np.resize(labels, F.num) if len(labels) == 1 else labels


def _pipeline_sample(F):
    """Text-to-image with the diffusers folder F.workdir -> (uint8 [N, H, W, 3], N prompts)."""
    import jaxgen

    if not F.prompt:
        raise app.UsageError("a Stable Diffusion folder generates from text: pass --prompt")
    if F.labels:
        raise app.UsageError("--labels are for class-conditional runs; a Stable Diffusion folder "
                             "takes --prompt")
    prompts = _prompts(F)
    if len(prompts) != F.num:
        raise app.UsageError(f"{len(prompts)} prompts for --num={F.num}: pass one prompt, or --num of them")
    pipe = jaxgen.StableDiffusionPipeline.from_pretrained(F.workdir)
    images = pipe(prompts, num_inference_steps=50 if F.steps is None else F.steps,
                  guidance_scale=7.5 if F.guidance is None else F.guidance, seed=F.seed,
                  scheduler=F.scheduler)                               # float [N, H, W, 3] in [0, 1]
    from jaxgen.data.pipeline import unit_to_uint8

    return unit_to_uint8(images, what=f"the pipeline in {F.workdir}"), prompts


def _prompts(F) -> list[str]:
    """One prompt per image: each --prompt --per_prompt times, or one --prompt for all --num, or
    the --prompt list as given."""
    if F.per_prompt:
        return [p for p in F.prompt for _ in range(F.per_prompt)]
    return list(F.prompt) * F.num if len(F.prompt) == 1 else list(F.prompt)


def _save(F, images, labels, prompts):
    from jaxgen.eval.images import make_grid, preview_upscale, prompt_grid_png, save_png

    os.makedirs(os.path.dirname(os.path.abspath(F.out)), exist_ok=True)
    if images.ndim == 5 and not F.out.endswith(".npz"):     # clips [N, F, H, W, 3] of a video run
        from jaxgen.eval.video import save_clips

        save_clips(F.out, images, ncol=min(len(images), 8))
        print(f"wrote {len(images)} clips of {images.shape[1]} frames to {F.out}")
        return
    if F.out.endswith(".gif"):
        raise app.UsageError(f"--out={F.out}: a .gif is written for a video run's clips; this one makes images "
                             "(use .png or .npz).")
    if F.out.endswith(".png") and F.per_prompt:
        prompt_grid_png(F.out, list(F.prompt), images, per_prompt=F.per_prompt)
    elif F.out.endswith(".png"):
        save_png(F.out, make_grid(images, ncol=min(F.num, 8), upscale=preview_upscale(images.shape[1])))
    else:
        extra = {k: v for k, v in (("labels", labels), ("prompts", prompts)) if v is not None}
        np.savez(F.out, images=images, **extra)
    print(f"wrote {len(images)} images to {F.out}")


if __name__ == "__main__":
    common.run(main)
