"""Evaluation of an instruction-editing run (``python -m train.eval`` of an ip2p run; docs/EDITING.md).

On shapes images the run never trained on (the test split's jitter draws), each example gets an
instruction of one kind (colour, shape, position, size; the canonical phrasings "make it blue",
"turn it into a square", "move it to the left", "make it small") and the shapes analyzer reads the
edited image:

* edit accuracy: the asked attribute has the asked value;
* preservation: the three other attributes are the input's;
per kind, at each image_guidance_scale of the sweep (the run's text guidance scale fixed), and a
PNG per scale: rows "instruction", input | output.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxgen.data import shapes
from jaxgen.eval.images import prompt_grid_png

EVAL_SEED = 0
EVAL_SPLIT = "test"


def edit_cases(num: int, seed: int = 0) -> dict:
    """``num`` test-split shapes examples with a canonical edit instruction each (every kind
    equally often in expectation; ``shapes.edit_triplets``)."""
    data = shapes.generate_split(EVAL_SPLIT, num, seed)
    return shapes.edit_triplets(data, seed, EVAL_SPLIT, canonical=True)


def edit_scores(edited: np.ndarray, cases: dict) -> dict[str, dict[str, float]]:
    """{kind: {"edit_accuracy", "preservation", "examples"}} and "all" for uint8 edited images."""
    read = shapes.analyze(edited)
    out = {}
    for k, kind in enumerate(shapes.EDIT_KINDS + ("all",)):
        rows = np.ones(len(edited), bool) if kind == "all" else cases["kind"] == k
        if not rows.any():
            continue
        hit = np.zeros(int(rows.sum()), bool)
        kept = np.ones(int(rows.sum()), bool)
        for a in shapes.ATTRIBUTES:
            same = read[a][rows] == cases["target"][a][rows]
            asked = cases["kind"][rows] == shapes.EDIT_KINDS.index(a)
            hit |= asked & same
            kept &= asked | same
        out[kind] = {"edit_accuracy": float(hit.mean()), "preservation": float(kept.mean()),
                     "examples": int(rows.sum())}
    return out


def evaluate(run, out_dir: str, eval_cfg=None) -> dict[str, Any]:
    """Edit accuracy and preservation per kind over an image_guidance_scale sweep (module doc)."""
    num = int(eval_cfg.examples) if eval_cfg is not None else 240
    scales = tuple(float(s) for s in (eval_cfg.image_guidance_scales if eval_cfg is not None
                                      else (1.0, 1.25, 1.5, 1.75, 2.0)))
    os.makedirs(out_dir, exist_ok=True)
    cases = edit_cases(num)
    out: dict[str, Any] = {"examples": num, "split": EVAL_SPLIT, "by_image_guidance": {}}
    default = float(run.config.sampling.image_guidance_scale)
    for ig in sorted(set(scales) | {default}):
        edited = run.edit(cases["source"], cases["instruction"], seed=EVAL_SEED, image_guidance_scale=ig)
        out["by_image_guidance"][f"{ig:g}"] = edit_scores(edited, cases)
        show = [int(np.flatnonzero(cases["kind"] == k)[j]) for k in range(len(shapes.EDIT_KINDS))
                for j in range(3) if (cases["kind"] == k).sum() > j]
        pairs = np.stack([np.stack([cases["source"][i], edited[i]]) for i in show]).reshape(-1, *edited.shape[1:])
        prompt_grid_png(os.path.join(out_dir, f"edits_ig{ig:g}.png"), [cases["instruction"][i] for i in show],
                        pairs, per_prompt=2)
    at_default = out["by_image_guidance"][f"{default:g}"]
    out["at_default"] = {"image_guidance_scale": default, **at_default}
    kinds = [k for k in shapes.EDIT_KINDS if k in at_default]
    out["target_edit_0.8_met"] = bool(all(at_default[k]["edit_accuracy"] >= 0.8 for k in kinds))
    out["target_preservation_0.9_met"] = bool(all(at_default[k]["preservation"] >= 0.9 for k in kinds))
    return out
