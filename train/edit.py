"""python -m train.edit --workdir DIR|FOLDER --prompt TEXT --edit-prompt TEXT --out FILE.png
                       [--mode replace|refine|reweight] [--cross-replace-steps F] [--self-replace-steps F]
                       [--equalizer WORD=W,...] [--blend-words WORD,...] [--steps S] [--guidance G]
                       [--scheduler CLASSNAME] [--seed S] [--step N]

Prompt-to-Prompt editing (jaxgen/pipelines/prompt_to_prompt.py, docs/EDITING.md) with a
text-to-image run (configs/shapes_ldm.py: run.prompt_to_prompt) or a diffusers Stable Diffusion
folder (it holds model_index.json). --prompt and --edit-prompt may be repeated (one pair each, or
one of either for all). Writes one PNG: per pair, source | edited | the source prompt's per-token
cross-attention maps over the source, and a row of the edit prompt's maps over the edited image.
--steps, --guidance and --scheduler default to the run's sampling settings (a folder: 50, 7.5,
its own scheduler).
"""
from __future__ import annotations

import os

from absl import app, flags

from train import common

flags.DEFINE_string("workdir", None, "text-to-image run directory, or a diffusers Stable Diffusion folder")
flags.DEFINE_multi_string("prompt", None, "source prompt(s)")
flags.DEFINE_multi_string("edit-prompt", None, "edited prompt(s): one per --prompt, or one for all")
flags.DEFINE_string("out", None, "output PNG: source | edited | attention maps")
flags.DEFINE_enum("mode", "replace", ["replace", "refine", "reweight"],
                  "replace (word swap, same token count), refine (added words), reweight (--equalizer)")
flags.DEFINE_float("cross-replace-steps", 0.8, "fraction of the steps the source's cross-attention is injected")
flags.DEFINE_float("self-replace-steps", 0.4, "fraction of the steps the source's self-attention is injected")
flags.DEFINE_list("equalizer", None, "re-weighting for --mode reweight: WORD=WEIGHT,... (weights may be negative)")
flags.DEFINE_list("blend-words", None, "local blend: words whose attention masks the edited region")
flags.DEFINE_integer("steps", None, "sampling steps (default: the run's / 50)", lower_bound=1)
flags.DEFINE_float("guidance", None, "classifier-free guidance scale (default: the run's / 7.5)")
flags.DEFINE_string("scheduler", None, "scheduler class name, e.g. DDIMScheduler")
flags.DEFINE_integer("seed", 0, "seed of the shared initial latents")
flags.DEFINE_integer("step", None, "checkpoint step of a run (default: the newest intact one)", lower_bound=0)
flags.mark_flags_as_required(["workdir", "prompt", "edit-prompt", "out"])


def _equalizer(items) -> dict[str, float] | None:
    """["red=2", "circle=-1"] -> {"red": 2.0, "circle": -1.0}; a UsageError for other forms."""
    if not items:
        return None
    out = {}
    for item in items:
        word, sep, weight = item.partition("=")
        try:
            out[word.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not word.strip():
            raise app.UsageError(f"--equalizer {item!r}: give WORD=WEIGHT pairs, e.g. --equalizer=red=2.5,blue=-1")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    if not F.out.endswith(".png"):
        raise app.UsageError(f"--out={F.out}: the file must end in .png")
    equalizer = _equalizer(F.equalizer)
    if (F.mode == "reweight") != (equalizer is not None):
        raise app.UsageError("--equalizer goes with --mode reweight, and --mode reweight needs --equalizer")
    common.setup_logging()
    import jaxgen
    from jaxgen.pipelines.prompt_to_prompt import write_edit

    folder = os.path.isfile(os.path.join(F.workdir, "model_index.json"))
    source = F.workdir if folder else jaxgen.load_run(F.workdir, step=F.step)
    src, _ = write_edit(source, F.prompt, F["edit-prompt"].value, F.out, seed=F.seed, mode=F.mode,
                        cross_replace_steps=F["cross-replace-steps"].value,
                        self_replace_steps=F["self-replace-steps"].value, equalizer=equalizer,
                        local_blend_words=F["blend-words"].value or None, num_inference_steps=F.steps,
                        guidance_scale=F.guidance, scheduler=F.scheduler)
    print(f"wrote {len(src)} edit(s) to {F.out}")


if __name__ == "__main__":
    common.run(main)
