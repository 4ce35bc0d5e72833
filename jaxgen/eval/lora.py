"""Evaluation of a LoRA that teaches a shapes model a new shape (``python -m train.eval`` of a lora
run; docs/LORA.md).

* ``new_word``: every colour x size x place with the new word ("a large red cross on the left",
  60 prompts x eval.samples_per_prompt): how often the shapes analyzer's ``is_cross`` reads a
  cross, and the colour, size and place read back; the same prompts through the base alone
  (lora_scale 0), which never saw the word, for contrast.
* ``without_word``: prompt adherence over the 180 canonical prompts of the base's own shapes,
  with the adapters (lora_scale 1) and without (the base), and their ratio per attribute (the
  target: >= 0.95 of the base's figures).
* the checkpoint's size: the adapters' bytes against the full U-Net's.
PNG: new-word prompts, base (top) and with the LoRA (bottom).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxgen.data import shapes
from jaxgen.eval import shapes as shapes_eval
from jaxgen.eval.images import prompt_grid_png

EVAL_SEED = 0


def evaluate(run, out_dir: str, eval_cfg=None) -> dict[str, Any]:
    per = int(eval_cfg.samples_per_prompt) if eval_cfg is not None else 2
    os.makedirs(out_dir, exist_ok=True)
    task = run.task
    word = str(run.config.lora.new_shape)
    rows = [(c, z, p) for c in range(len(shapes.COLORS)) for z in range(len(shapes.SIZES))
            for p in range(len(shapes.POSITIONS))]
    prompts = [f"a {shapes.SIZES[z]} {shapes.COLORS[c]} {word} {shapes.PLACE_PHRASES[p]}"
               for c, z, p in rows for _ in range(per)]
    attrs = {"color": np.repeat([r[0] for r in rows], per), "size": np.repeat([r[1] for r in rows], per),
             "position": np.repeat([r[2] for r in rows], per)}
    out: dict[str, Any] = {"new_shape": word, "new_word": {}, "without_word": {}}
    grids = {}
    for name, scale in (("lora", 1.0), ("base", 0.0)):
        images = run.sample(len(prompts), prompts=prompts, seed=EVAL_SEED, lora_scale=scale)
        read = shapes.analyze(images)
        out["new_word"][name] = {"is_" + word: float(shapes.is_cross(images).mean()),
                                 **{a: float((read[a] == v).mean()) for a, v in attrs.items()}}
        grids[name] = images
    out["target_new_shape_met"] = bool(out["new_word"]["lora"]["is_" + word] >= 0.8)
    for name, scale in (("lora", 1.0), ("base", 0.0)):
        report, _ = shapes_eval.prompt_adherence(lambda n, **kw: run.sample(n, lora_scale=scale, **kw), per)
        out["without_word"][name] = report["all_combinations"]
    base, lora = out["without_word"]["base"], out["without_word"]["lora"]
    out["without_word"]["ratio"] = {a: (lora[a] / base[a] if base[a] > 0 else float("nan"))
                                    for a in ("shape", "color", "size", "position")}
    out["target_preserved_0.95_met"] = bool(all(r >= 0.95 for r in out["without_word"]["ratio"].values()))
    sizes = task.adapter_bytes(run.params)
    out["checkpoint"] = {"adapter_bytes": sizes["lora"], "unet_bytes": sizes["unet"],
                         "fraction": sizes["lora"] / sizes["unet"]}
    show = list(range(0, len(prompts), max(1, len(prompts) // 10)))[:10]
    both = np.stack([np.stack([grids["base"][i], grids["lora"][i]]) for i in show]).reshape(-1, *grids["lora"].shape[1:])
    prompt_grid_png(os.path.join(out_dir, f"lora_{word}.png"), [prompts[i] + " (base | LoRA)" for i in show], both,
                    per_prompt=2)
    return out
