"""Pipelines: whole sampling runs (text encoder, denoising loop, VAE) compiled as one program.

    pipe = jaxgen.StableDiffusionPipeline.from_pretrained(folder)   # diffusers layout
    images = pipe(prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=7.5,
                  height=None, width=None, seed=0, latents=None, scheduler=None)
    images = pipe.img2img(prompt, image, strength=0.8)          # image-to-image
    images = pipe.inpaint(prompt, image, mask_image)            # inpainting
    # float32 numpy [B, H, W, 3] in [0, 1]

    pipe = jaxgen.StableDiffusionControlNetPipeline.from_pretrained(folder, controlnet=None)
    images = pipe(prompt, image=control, controlnet_conditioning_scale=1.0,
                  control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False)

StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline are the same object with
``__call__`` bound to img2img / inpaint (diffusers' class names). See docs/PIPELINES.md and
docs/CONTROLNET.md.
"""
from jaxgen.pipelines.controlnet import StableDiffusionControlNetPipeline
from jaxgen.pipelines.text_to_video import TextToVideoSDPipeline
from jaxgen.pipelines.instruct_pix2pix import StableDiffusionInstructPix2PixPipeline
from jaxgen.pipelines.upscale import StableDiffusionUpscalePipeline, upscale_condition
from jaxgen.pipelines.stable_diffusion import (StableDiffusionImg2ImgPipeline,
                                               StableDiffusionInpaintPipeline,
                                               StableDiffusionPipeline, rescale_guidance)

__all__ = ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
           "StableDiffusionInpaintPipeline", "StableDiffusionControlNetPipeline", "rescale_guidance",
           "StableDiffusionInstructPix2PixPipeline",
           "StableDiffusionUpscalePipeline", "upscale_condition"]
