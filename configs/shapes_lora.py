"""python -m train --config configs/shapes_lora.py --workdir runs/shapes_lora --config.base_run=runs/shapes_ldm

LoRA, DreamBooth-style: teach a finished shapes latent-diffusion run (configs/shapes_ldm.py;
``base_run``) the word "cross" for a shape it never saw (a plus sign, drawn in every colour, size
and place: "a large red cross on the left"). Rank-4 adapters on the U-Net's attention projections
(to_q, to_k, to_v, to_out.0) and resnet convolutions (conv1, conv2) are the only trained parameters
(optimizer state and checkpoints hold only them); half of the examples are the base's own training
data (prior preservation), on which, and on every caption-dropped example, the adapted U-Net is
distilled to the frozen base's prediction, so prompts without the new word keep the base's
adherence.
``python -m train.sample --workdir runs/shapes_lora --prompt "a large red cross on the left" --out x.png``
``python -m train.eval --workdir runs/shapes_lora``: the new word read back, the base's adherence
kept, the adapters' size (docs/LORA.md).
``python -m train.export --workdir runs/shapes_lora --out DIR``: the base as a diffusers
StableDiffusionPipeline folder and DIR/lora/pytorch_lora_weights.safetensors, which diffusers'
``pipe.load_lora_weights(DIR + "/lora")`` loads.

Arguments: tiny (2 steps of batch 16, for tests; base_run must then be a tiny shapes_ldm run).
"""
import ml_collections

from configs.common import base_config, data_options, make_tiny, parse_arg


def get_config(arg: str | None = None):
    words = parse_arg(arg, ("tiny",))
    c = base_config()
    c.task = "lora"
    c.base_run = "runs/shapes_ldm"
    c.data = ml_collections.ConfigDict({"name": "shapes", "train_split": "train", "eval_split": "test",
                                        "heldout_split": "heldout", "data_dir": "", "options": data_options()})
    c.model_class = "jaxgen.nn.unet:UNet2DConditionModel"     # the base's, adapted
    c.model = ml_collections.ConfigDict()
    c.lora = ml_collections.ConfigDict({
        "new_shape": "cross", "new_examples": 1200,         # 20 per colour x size x place
        "rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"),
        "preservation_fraction": 0.5, "caption_dropout": 0.1,
        "preservation_target": "base",   # "data": the real images' targets (docs/LORA.md compares)
    })
    c.sampling = ml_collections.ConfigDict({"num_steps": None, "guidance_scale": None})   # None: the base's
    c.eval = ml_collections.ConfigDict({"samples_per_prompt": 2})
    c.batch_size = 64
    c.total_steps = 2000
    c.checkpoint_every = 500
    c.log_every = 50
    c.image_every = 0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.ema = ml_collections.ConfigDict({"decay": 0.0, "warmup": True})
    if "tiny" in words:
        make_tiny(c)
        c.lora.new_examples = 32
        c.eval.samples_per_prompt = 1
    return c
