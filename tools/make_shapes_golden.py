#!/usr/bin/env python3
"""Golden references for the trained tiny shapes model (models/tiny-shapes), from diffusers.

Loads the committed folder with diffusers' StableDiffusionPipeline (so diffusers reads it
unchanged), then writes tests/fixtures/golden/shapes.safetensors:
  latents_init   [1, 4, 16, 16]  the initial latents both sides start from
  text_states    [1, 77, W]      CLIP text states of PROMPT (W: the text encoder width)
  unet_eps       [2, 4, 16, 16]  server U-Net output at timestep 501 (CFG batch: "", PROMPT)
  device_eps     [2, 4, 16, 16]  the same for device_unet/unet, when present
  latents_final  [1, 4, 16, 16]  after a DDIM generation (STEPS steps, guidance 5)
  image          [1, 3, 64, 64]  its VAE decode in [0, 1]
The Rust golden test that matches Veil to these lands with the model (written in commit 3ffa16d).

Usage: python3 tools/make_shapes_golden.py [--model models/tiny-shapes]
"""
import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file

PROMPT = "a large red circle at the top left on a white background"
STEPS = 4
GUIDANCE = 5.0
TIMESTEP = 501


def main():
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--model", type=Path, default=root / "models/tiny-shapes")
    ap.add_argument("--out", type=Path, default=root / "tests/fixtures/golden/shapes.safetensors")
    args = ap.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1234)
    latents = torch.randn((1, 4, 16, 16), generator=g)
    out = {"latents_init": latents.clone()}
    with torch.no_grad():
        ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        states = pipe.text_encoder(ids).last_hidden_state
        out["text_states"] = states[:1].clone()
        context = torch.cat([states[1:], states[:1]])
        x = torch.cat([latents, latents])
        out["unet_eps"] = pipe.unet(x, TIMESTEP, encoder_hidden_states=context).sample
        device_dir = args.model / "device_unet" / "unet"
        if device_dir.exists():
            device = UNet2DConditionModel.from_pretrained(device_dir)
            out["device_eps"] = device(x, TIMESTEP, encoder_hidden_states=context).sample
        result = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      latents=latents.clone(), output_type="latent")
        final = result.images
        out["latents_final"] = final
        img = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
        out["image"] = (img / 2 + 0.5).clamp(0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in out.items()}, args.out,
              metadata={"generator": "tools/make_shapes_golden.py", "prompt": PROMPT,
                        "steps": str(STEPS), "guidance": str(GUIDANCE), "timestep": str(TIMESTEP)})
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))


if __name__ == "__main__":
    main()
