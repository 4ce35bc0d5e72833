"""python -m train.sample --workdir DIR --num N --out FILE(.png|.npz) [--labels ...] [--prompt TEXT]
                          [--steps S] [--guidance G] [--scheduler CLASSNAME] [--seed S]

Generates N images from a generative run (uint8 NHWC): a PNG grid, or an .npz with
``images`` (and ``labels`` / ``prompts`` when given). For an autoencoder run, decodes N random
codes drawn from the spread of the test set's codes.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from train import common

flags.DEFINE_string("workdir", None, "run directory")
flags.DEFINE_integer("num", 16, "number of images")
flags.DEFINE_string("out", None, "output file: .png (grid) or .npz")
flags.DEFINE_list("labels", None, "class labels, one per image or one for all")
flags.DEFINE_multi_string("prompt", None, "text prompt(s), one per image or one for all")
flags.DEFINE_integer("steps", None, "sampling steps (default: the config's)")
flags.DEFINE_float("guidance", None, "classifier-free guidance scale (default: the config's)")
flags.DEFINE_string("scheduler", None, "scheduler class name, e.g. DDIMScheduler (default: the config's)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    common.setup_logging()
    common.init_distributed()
    import jaxgen
    from jaxgen.errors import JaxgenError
    from jaxgen.eval.images import make_grid, save_png

    F = flags.FLAGS
    if not F.out.endswith((".png", ".npz")):
        raise app.UsageError("--out must end in .png or .npz")
    try:
        run = jaxgen.load_run(F.workdir, step=F.step)
        labels = None
        if F.labels:
            labels = np.asarray([int(v) for v in F.labels], np.int32)
            labels = np.resize(labels, F.num) if len(labels) == 1 else labels
        prompts = None
        if F.prompt:
            prompts = list(F.prompt) * F.num if len(F.prompt) == 1 else list(F.prompt)
        if hasattr(run.task, "sample"):
            images = run.sample(F.num, seed=F.seed, labels=labels, prompts=prompts, num_steps=F.steps,
                                guidance_scale=F.guidance, scheduler=F.scheduler)
        elif hasattr(run.task, "decode"):
            images = run.task.sample_codes(run, F.num, F.seed)
        else:
            raise JaxgenError(f"a {run.task.name!r} run does not generate images.")
    except JaxgenError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(os.path.dirname(os.path.abspath(F.out)), exist_ok=True)
    if F.out.endswith(".png"):
        save_png(F.out, make_grid(images, ncol=min(F.num, 8), upscale=4 if images.shape[1] < 16 else 1))
    else:
        extra = {k: v for k, v in (("labels", labels), ("prompts", prompts)) if v is not None}
        np.savez(F.out, images=images, **extra)
    print(f"wrote {len(images)} images to {F.out}")


if __name__ == "__main__":
    app.run(main)
