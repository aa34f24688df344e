#!/usr/bin/env python3
"""Golden fixture for image-to-image, produced by diffusers' own StableDiffusionImg2ImgPipeline.

On the committed tiny model (models/tiny-random, 64 px, latent 8x8) it runs img2img from a
deterministic init image (a colour gradient with a red disc, written as a PNG so that both sides
read the same 8-bit pixels) with given noise, for DDIM and Euler at strength 0.6 and 0.3, and
records the latents after every step (callback_on_step_end) and the final image.

Two things are pinned so that the run is a pure function of the fixture:

* the VAE posterior: diffusers' img2img samples it (`retrieve_latents(..., sample_mode="sample")`
  with the generator); Veil encodes with the posterior mean (deterministic, and what
  `sample_mode="argmax"` returns). The pipeline module's `retrieve_latents` is wrapped to force
  `sample_mode="argmax"`;
* the noise added at the first kept timestep: the module's `randn_tensor` is wrapped to return
  the fixture's `noise` tensor (Veil's `GenerateOptions::noise`, the CLI's `--noise`).

Everything else (preprocessing to [-1, 1], scaling_factor, get_timesteps(num_inference_steps,
strength), set_begin_index, scheduler.add_noise at timesteps[:1], the CFG loop, decoding) is
diffusers' own code. tests/tests/img2img.rs replays every case through Veil.

Writes tests/fixtures/golden/img2img.safetensors, img2img.json and img2img_init.png.

Usage: /work/venv/bin/python tools/make_img2img_golden.py
"""

import json
import os
import platform
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import PIL.Image
import safetensors
import torch
import diffusers
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-random")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "golden")

PROMPT = "a small red circle at the top left on a white background"
SIZE = 64
STEPS = 10
GUIDANCE = 5.0
NOISE_SEED = 2024
CASES = [
    ("ddim", 0.6),
    ("ddim", 0.3),
    ("euler", 0.6),
    ("euler", 0.3),
]
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}

# The noise the pipeline's prepare_latents draws: ours.
NOISE = {}
_randn = img2img_module.randn_tensor
_retrieve = img2img_module.retrieve_latents


def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
    n = NOISE["noise"]
    assert tuple(shape) == tuple(n.shape), (shape, n.shape)
    return n.clone().to(device=device, dtype=dtype)


def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    return _retrieve(encoder_output, generator=generator, sample_mode="argmax")


img2img_module.randn_tensor = fixed_noise
img2img_module.retrieve_latents = posterior_mean


def init_image() -> np.ndarray:
    """[H, W, 3] uint8: red rises left to right, green top to bottom, blue constant, and a
    reddish disc left of centre."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = np.zeros((SIZE, SIZE, 3), dtype=np.float64)
    img[..., 0] = 40 + 180 * x / (SIZE - 1)
    img[..., 1] = 30 + 200 * y / (SIZE - 1)
    img[..., 2] = 110.0
    disc = (x - 22) ** 2 + (y - 26) ** 2 <= 13**2
    img[disc] = [235, 60, 45]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main() -> None:
    torch.set_grad_enabled(False)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(OUT_DIR, exist_ok=True)
    png_path = os.path.join(OUT_DIR, "img2img_init.png")
    PIL.Image.fromarray(init_image(), "RGB").save(png_path)
    # Read back, as Veil does: the pipeline sees the PNG's pixels.
    pil = PIL.Image.open(png_path).convert("RGB")
    pixels = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()

    base = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    vae = base.vae
    lat_h = SIZE // base.vae_scale_factor
    noise = torch.randn(1, vae.config.latent_channels, lat_h, lat_h, generator=torch.Generator().manual_seed(NOISE_SEED))
    NOISE["noise"] = noise
    # The scaled posterior mean, computed directly (what the pipeline's encoding must equal).
    x = (pixels * 2.0 - 1.0).unsqueeze(0)
    init_latents = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    tensors = {"init_image": pixels, "noise": noise.contiguous(), "init_latents": init_latents.contiguous()}
    cases = []
    for sname, strength in CASES:
        sched = SCHEDULERS[sname].from_config(base.scheduler.config)
        pipe = StableDiffusionImg2ImgPipeline(**{**base.components, "scheduler": sched})
        pipe.set_progress_bar_config(disable=True)
        steps, timesteps = [], []

        def cb(p, i, t, kw):
            steps.append(kw["latents"].clone())
            timesteps.append(float(t))
            return kw

        start = {}
        orig_add_noise = sched.add_noise

        def add_noise(original, n, t):
            out = orig_add_noise(original, n, t)
            start["latents"], start["original"], start["t"] = out.clone(), original.clone(), t.clone()
            return out

        sched.add_noise = add_noise
        image = pipe(
            prompt=PROMPT,
            image=pil,
            strength=strength,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            output_type="pt",
            callback_on_step_end=cb,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        key = f"{sname}/s{strength}"
        # The pipeline's own encoding (its preprocessing rounds differently in the last ulp).
        enc_err = float((start["original"] - init_latents).abs().max())
        assert enc_err < 1e-5, f"{key}: the pipeline's encoding differs from the posterior mean by {enc_err}"
        tensors["init_latents"] = start["original"].contiguous()
        tensors[f"{key}/start"] = start["latents"].contiguous()
        tensors[f"{key}/latents"] = torch.cat(steps, 0).contiguous()
        tensors[f"{key}/image"] = image[0].contiguous()
        init_timestep = min(int(STEPS * strength), STEPS)
        cases.append(
            {
                "key": key,
                "scheduler": sname,
                "class": type(sched).__name__,
                "strength": strength,
                "num_inference_steps": STEPS,
                "t_start": STEPS - init_timestep,
                "steps_run": len(steps),
                "add_noise_timestep": float(start["t"][0]),
                "timesteps": timesteps,
            }
        )
        print(f"{key}: {len(steps)} steps from t={timesteps[0]}, image mean {float(image.mean()):.4f}", file=sys.stderr)

    st_path = os.path.join(OUT_DIR, "img2img.safetensors")
    save_file(tensors, st_path, metadata={"generator": "tools/make_img2img_golden.py"})
    meta = {
        "generator": "tools/make_img2img_golden.py",
        "description": "StableDiffusionImg2ImgPipeline on models/tiny-random with the posterior mean "
        "(retrieve_latents forced to sample_mode='argmax') and given noise (randn_tensor replaced). "
        "Replayed by tests/tests/img2img.rs.",
        "prompt": PROMPT,
        "negative_prompt": None,
        "guidance_scale": GUIDANCE,
        "size": SIZE,
        "noise_seed": NOISE_SEED,
        "tensors": {
            "init_image": "f32 [3, 64, 64] in [0, 1]: img2img_init.png's pixels / 255",
            "noise": "f32 [1, 4, 8, 8], torch.randn with torch.Generator().manual_seed(noise_seed)",
            "init_latents": "f32 [1, 4, 8, 8]: the pipeline's vae.encode(preprocess(image)).latent_dist.mode() * scaling_factor",
            "<scheduler>/s<strength>/start": "f32 [1, 4, 8, 8]: scheduler.add_noise(init_latents, noise, timesteps[:1])",
            "<scheduler>/s<strength>/latents": "f32 [steps_run, 4, 8, 8]: latents after every step (callback_on_step_end)",
            "<scheduler>/s<strength>/image": "f32 [3, 64, 64]: pipe(..., output_type='pt').images[0]",
        },
        "tolerance": "relative L2 <= 1e-4 per step; image PSNR >= 40 dB",
        "cases": cases,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    with open(os.path.join(OUT_DIR, "img2img.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for p in (st_path, png_path, os.path.join(OUT_DIR, "img2img.json")):
        os.chmod(p, 0o644)
    print(f"wrote {st_path} ({os.path.getsize(st_path)} bytes), {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
