#!/usr/bin/env python3
"""Tiny random Stable Diffusion *inpainting* pipeline and golden trajectories of diffusers'
StableDiffusionInpaintPipeline.

Writes
  tests/fixtures/inpaint/model/              diffusers layout of a StableDiffusionInpaintPipeline
                                             (model_index.json, text_encoder/, tokenizer/, unet/,
                                             vae/, scheduler/), safetensors weights. text_encoder,
                                             tokenizer, vae and scheduler are models/tiny-random's
                                             (loaded and saved again; every file is checked to be
                                             byte-identical to tiny-random's); the U-Net is new: the
                                             SD1.5-/SD2-inpainting layout, in_channels 9
                                             (4 latent + 1 mask + 4 masked-image latents),
                                             out_channels 4, seeded random weights
  tests/fixtures/inpaint/image.png           64x64 RGB init image (coloured shapes on a gradient)
  tests/fixtures/inpaint/mask.png            64x64 8-bit grayscale ('L') mask, white = repaint,
                                             black = keep: a rectangle and a circle, off the 8-pixel
                                             latent grid, the circle edged with 128 (-> repaint)
                                             and 127 (-> keep) pixels to pin the 0.5 threshold
  tests/fixtures/inpaint/golden.safetensors  reference tensors (float32)
  tests/fixtures/inpaint/golden.json         description of every tensor, the cases, timesteps,
                                             mask/image preprocessing, U-Net input channel order,
                                             versions

The U-Net has the config of models/tiny-random/unet/config.json except in_channels 9 and
block_out_channels [8, 16] instead of [32, 64]: at [32, 64] the U-Net alone is 3.2 MB (the
reused VAE + text encoder + tokenizer are already 1.52 MB) and the fixture must stay under 2 MiB;
every other key (block types, layers_per_block 1, cross_attention_dim 32, attention_head_dim 4,
norm_num_groups 8, sample_size 8, ...) is kept. Weights: torch.manual_seed init, then
make_golden.perturb (no zero layer: norm weights 1+0.1*randn, biases 0.1*randn, all-zero weights
+0.05*randn), then conv_out.weight *= UNET_CONV_OUT_GAIN.

Two things are pinned so that every run is a pure function of the stored tensors:

* the VAE posterior. diffusers' inpaint pipeline encodes with
  `retrieve_latents(vae.encode(x), generator=generator)`, i.e. sample_mode="sample": a random
  draw from the posterior (the masked image, and for strength < 1 also the init image). Veil
  encodes with the posterior mean. The pipeline module's `retrieve_latents` (a module-level
  function that `_encode_vae_image` looks up at call time) is replaced by a wrapper that calls the
  original with sample_mode="argmax", which returns `latent_dist.mode()` = the mean;
* the noise. strength 1.0 (cases a, b): the pipeline is given `latents=noise` and
  prepare_latents returns `noise * scheduler.init_noise_sigma` (1 for DDIM, sqrt(sigma_max^2+1)
  for Euler). strength < 1 (case c): `latents=` must NOT be given: diffusers 0.42.1's
  prepare_latents then ignores the image entirely (`latents = given * init_noise_sigma`, not
  add_noise(image_latents, ...)). Instead latents=None and the module's `randn_tensor` is
  replaced to return the stored `noise`, so the start is diffusers' own
  `scheduler.add_noise(image_latents, noise, timesteps[:1])` with image_latents =
  posterior mean of the *unmasked* init image * scaling_factor.

Everything else (image/mask preprocessing, binarisation, the mask's resize to the latent grid,
masked-image encoding, get_timesteps(num_inference_steps, strength), set_begin_index, CFG,
scale_model_input, the 9-channel concatenation, decoding) is diffusers' own code; the script
recomputes every intermediate independently and asserts agreement. For a 9-channel U-Net there
is no per-step blending with the noised init latents (that is the 4-channel path only): the
script asserts scheduler.add_noise runs once (case c) or never (a, b).

All goldens are computed with the pipeline *re-loaded from disk*. float32 on CPU, fixed seeds.

Usage: /work/venv/bin/python tools/make_inpaint_golden.py [--root <repo root>]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import PIL
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden  # noqa: E402

PROMPT = "a small red circle at the top left on a white background"
NEGATIVE_PROMPT = ""
GUIDANCE = 5.0
SIZE = 64
UNET_BLOCK_OUT_CHANNELS = [8, 16]
UNET_CONV_OUT_GAIN = 2.0
REUSED = ("text_encoder", "tokenizer", "vae", "scheduler")
MAX_BYTES = 2 * 1024 * 1024  # the whole of tests/fixtures/inpaint

SEEDS = {
    "unet_init": 20,
    "perturb_unet": 120,
    "noise": 2025,
}

# (key, scheduler, num_inference_steps, strength)
CASES = [
    ("ddim4_s1.0", "ddim", 4, 1.0),
    ("euler4_s1.0", "euler", 4, 1.0),
    ("ddim6_s0.6", "ddim", 6, 0.6),
]

# Mask geometry (pixels). The rectangle covers rows 5..29, columns 13..40 (inclusive); the circle
# is filled up to radius R and has a 1.6-pixel ring outside it of 128 (upper half: binarises to 1,
# repaint) and 127 (lower half: binarises to 0, keep).
MASK_RECT = (5, 30, 13, 41)  # y0, y1, x0, x1 (exclusive ends)
MASK_CIRCLE = (44.5, 43.0, 11.6, 1.6)  # cx, cy, R, ring width

import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module  # noqa: E402

_randn = inpaint_module.randn_tensor
_retrieve = inpaint_module.retrieve_latents
PATCH = {"noise": None, "randn_calls": 0, "retrieve_calls": 0}


def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
    """Replaces the pipeline module's randn_tensor: the stored noise."""
    n = PATCH["noise"]
    assert tuple(shape) == tuple(n.shape), (shape, n.shape)
    PATCH["randn_calls"] += 1
    return n.clone().to(device=device, dtype=dtype)


def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
    """Replaces the pipeline module's retrieve_latents: the posterior mean, never a sample."""
    PATCH["retrieve_calls"] += 1
    return _retrieve(encoder_output, generator=generator, sample_mode="argmax")


inpaint_module.randn_tensor = fixed_noise
inpaint_module.retrieve_latents = posterior_mean


def init_image() -> np.ndarray:
    """[64, 64, 3] uint8: a warm vertical gradient with a red disc (top left), a blue rectangle
    (top right), a green triangle (bottom left) and a yellow square (bottom right)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    img = np.zeros((SIZE, SIZE, 3), dtype=np.float64)
    img[..., 0] = 205 + 40 * y / (SIZE - 1)
    img[..., 1] = 225 + 15 * y / (SIZE - 1)
    img[..., 2] = 245 - 45 * y / (SIZE - 1)
    img[(x - 18) ** 2 + (y - 17) ** 2 <= 11**2] = [220, 40, 40]
    img[6:24, 34:58] = [40, 80, 200]
    tri = (y <= 58) & (y - 34 >= np.abs(x - 30) * (24 / 22))
    img[tri] = [50, 170, 70]
    img[42:60, 44:60] = [240, 200, 40]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def mask_image() -> np.ndarray:
    """[64, 64] uint8, 255 = repaint: MASK_RECT and MASK_CIRCLE (with its 128/127 ring)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    y0, y1, x0, x1 = MASK_RECT
    m[y0:y1, x0:x1] = 255
    cx, cy, r, ring_w = MASK_CIRCLE
    d = np.hypot(x - cx, y - cy)
    m[d <= r] = 255
    ring = (d > r) & (d <= r + ring_w)
    m[ring & (y < cy)] = 128
    m[ring & (y >= cy)] = 127
    return m


def unet_config(model_root: str) -> dict:
    with open(os.path.join(model_root, "unet", "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    cfg["in_channels"] = 9
    cfg["block_out_channels"] = list(UNET_BLOCK_OUT_CHANNELS)
    return cfg


def public_config(cfg) -> dict:
    """A config without its private bookkeeping keys (e.g. `_use_default_values`, an unordered list)."""
    return {k: v for k, v in sorted(dict(cfg).items()) if not k.startswith("_")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    args = ap.parse_args()

    import diffusers
    import safetensors
    import safetensors.torch
    import transformers
    from diffusers import (
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.set_grad_enabled(False)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    src_dir = os.path.join(args.root, "models", "tiny-random")
    out_dir = os.path.join(args.root, "tests", "fixtures", "inpaint")
    model_dir = os.path.join(out_dir, "model")
    os.makedirs(out_dir, exist_ok=True)

    # ---------------------------------------------------------------- build the model folder
    src = StableDiffusionPipeline.from_pretrained(src_dir, safety_checker=None, requires_safety_checker=False)
    ucfg = unet_config(src_dir)
    torch.manual_seed(SEEDS["unet_init"])
    unet = UNet2DConditionModel(**ucfg).eval()
    perturb_stats = make_golden.perturb(unet, SEEDS["perturb_unet"])
    unet.conv_out.weight.mul_(UNET_CONV_OUT_GAIN)
    pipe = StableDiffusionInpaintPipeline(
        vae=src.vae,
        text_encoder=src.text_encoder,
        tokenizer=src.tokenizer,
        unet=unet,
        scheduler=src.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # save_pretrained writes the weights byte-identically but adds loader bookkeeping to configs
    # (`_name_or_path`, `is_local`, ...) and writes only tokenizer.json + tokenizer_config.json.
    # Restore tiny-random's exact files (weights are compared first, so only metadata changes);
    # vae/latent_preview.json (Veil's preview projection, not a diffusers file) is not copied.
    restored = []
    for comp in REUSED:
        for name in sorted(os.listdir(os.path.join(src_dir, comp))):
            if name == "latent_preview.json":
                continue
            a, b = os.path.join(src_dir, comp, name), os.path.join(model_dir, comp, name)
            if name.endswith(".safetensors"):
                assert filecmp.cmp(a, b, shallow=False), f"{comp}/{name}: saved weights differ from tiny-random's"
            elif not (os.path.exists(b) and filecmp.cmp(a, b, shallow=False)):
                shutil.copyfile(a, b)
                restored.append(f"{comp}/{name}")
        extra = set(os.listdir(os.path.join(model_dir, comp))) - set(os.listdir(os.path.join(src_dir, comp)))
        assert not extra, (comp, extra)
    ref_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    del pipe, src, unet

    # ---------------------------------------------------------------- inputs (PNG round trip)
    img_path, mask_path = os.path.join(out_dir, "image.png"), os.path.join(out_dir, "mask.png")
    PIL.Image.fromarray(init_image(), "RGB").save(img_path)
    PIL.Image.fromarray(mask_image(), "L").save(mask_path)
    pil_image = PIL.Image.open(img_path)
    pil_mask = PIL.Image.open(mask_path)
    assert pil_image.mode == "RGB" and pil_mask.mode == "L", (pil_image.mode, pil_mask.mode)
    image = torch.from_numpy(np.asarray(pil_image).astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
    mask = torch.from_numpy(np.asarray(pil_mask).astype(np.float32) / 255.0).unsqueeze(0).contiguous()

    # ---------------------------------------------------------------- reload from disk
    base = StableDiffusionInpaintPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    vae, unet = base.vae, base.unet
    assert isinstance(base.scheduler, DDIMScheduler), type(base.scheduler)
    assert unet.config.in_channels == 9 and unet.config.out_channels == 4
    sd = unet.state_dict()
    assert sd.keys() == ref_unet.keys() and all(torch.equal(sd[k], ref_unet[k]) for k in sd), "reloaded U-Net differs"
    sf = vae.config.scaling_factor
    lat = SIZE // base.vae_scale_factor
    noise = torch.randn(1, vae.config.latent_channels, lat, lat, generator=torch.Generator().manual_seed(SEEDS["noise"]))
    PATCH["noise"] = noise

    # Independent recomputation of the case-independent intermediates.
    mask_bin = (mask >= 0.5).float().unsqueeze(0)  # [1,1,64,64]
    image_pm = (image * 2.0 - 1.0).unsqueeze(0)  # [1,3,64,64] in [-1,1]
    ref_masked_image = image_pm * (mask_bin < 0.5)
    ref_mask_latent = mask_bin[:, :, :: base.vae_scale_factor, :: base.vae_scale_factor]
    ref_masked_image_latents = vae.encode(ref_masked_image).latent_dist.mean * sf
    ref_image_latents = vae.encode(image_pm).latent_dist.mean * sf

    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}

    def put(name, t, what):
        out[name] = t.detach().cpu().to(torch.float32).contiguous()
        desc[name] = what

    put("image", image, "f32 [3,64,64] in [0,1]: image.png's RGB pixels / 255 (what the pipeline was given, as a PIL image)")
    put("mask", mask, "f32 [1,64,64] in [0,1]: mask.png's 8-bit gray pixels / 255 (255 = repaint); values 0, 127/255, 128/255, 1")
    put("noise", noise, f"f32 [1,4,8,8]: torch.randn(1,4,8,8, generator=torch.Generator().manual_seed({SEEDS['noise']}))")

    shared: dict[str, torch.Tensor] = {}
    cases, checks = [], {}
    schedulers = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    for key, sname, steps_n, strength in CASES:
        sched = schedulers[sname].from_config(base.scheduler.config)
        pipe = StableDiffusionInpaintPipeline(**{**base.components, "scheduler": sched}, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        rec: dict = {"steps": [], "t": [], "add_noise": []}

        orig_pml = pipe.prepare_mask_latents

        def prepare_mask_latents(mask_in, masked_image_in, *a, _orig=orig_pml, **kw):
            m, mil = _orig(mask_in, masked_image_in, *a, **kw)
            rec["mask_condition"], rec["masked_image"] = mask_in.clone(), masked_image_in.clone()
            rec["mask_cfg"], rec["mil_cfg"] = m.clone(), mil.clone()
            return m, mil

        pipe.prepare_mask_latents = prepare_mask_latents
        orig_pl = pipe.prepare_latents

        def prepare_latents(*a, _orig=orig_pl, **kw):
            res = _orig(*a, **kw)
            rec["start"] = res[0].clone()
            return res

        pipe.prepare_latents = prepare_latents
        orig_add_noise = sched.add_noise

        def add_noise(original, n, t, _orig=orig_add_noise):
            rec["add_noise"].append((original.clone(), n.clone(), t.clone()))
            return _orig(original, n, t)

        sched.add_noise = add_noise

        def pre_hook(mod, a, kw):
            if "unet_in" not in rec:
                rec["unet_in"], rec["unet_t"] = a[0].clone(), a[1].clone() if torch.is_tensor(a[1]) else torch.tensor(a[1])

        def post_hook(mod, a, kw, o):
            if "unet_out" not in rec:
                rec["unet_out"] = (o[0] if isinstance(o, tuple) else o.sample).clone()

        def cb(p, i, t, kw):
            rec["steps"].append(kw["latents"].clone())
            rec["t"].append(float(t))
            return kw

        h1 = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
        h2 = unet.register_forward_hook(post_hook, with_kwargs=True)
        PATCH["randn_calls"] = PATCH["retrieve_calls"] = 0
        given = dict(latents=noise.clone()) if strength == 1.0 else {}
        result = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            image=pil_image,
            mask_image=pil_mask,
            height=SIZE,
            width=SIZE,
            strength=strength,
            num_inference_steps=steps_n,
            guidance_scale=GUIDANCE,
            eta=0.0,
            output_type="np",
            callback_on_step_end=cb,
            callback_on_step_end_tensor_inputs=["latents"],
            **given,
        )
        h1.remove()
        h2.remove()
        np_image = torch.from_numpy(result.images[0].copy())
        randn_calls, retrieve_calls = PATCH["randn_calls"], PATCH["retrieve_calls"]

        # ------------------------------------------------ checks of this run
        c: dict = {}
        n_run = len(rec["steps"])
        init_timestep = min(int(steps_n * strength), steps_n)
        t_start = steps_n - init_timestep
        assert n_run == init_timestep, (key, n_run, init_timestep)
        assert torch.equal(rec["mask_condition"], mask_bin), f"{key}: mask_condition != (mask >= 0.5)"
        assert torch.equal(rec["masked_image"], ref_masked_image), f"{key}: masked image"
        m1, m2 = rec["mask_cfg"].chunk(2)
        l1, l2 = rec["mil_cfg"].chunk(2)
        assert torch.equal(m1, m2) and torch.equal(l1, l2), "CFG halves of mask / masked_image_latents differ"
        assert torch.equal(m1, ref_mask_latent), f"{key}: mask latent is not mask_condition[..., ::8, ::8]"
        c["masked_image_latents_vs_posterior_mean_max_abs"] = float((l1 - ref_masked_image_latents).abs().max())
        assert c["masked_image_latents_vs_posterior_mean_max_abs"] < 1e-5, (key, c)
        for name, t in (("mask_latent", m1), ("masked_image", rec["masked_image"]), ("masked_image_latents", l1), ("mask_condition", rec["mask_condition"])):
            if name in shared:
                assert torch.equal(shared[name], t), f"{key}: {name} differs between cases"
            else:
                shared[name] = t
        init_sigma = float(sched.init_noise_sigma)
        if strength == 1.0:
            assert randn_calls == 0 and retrieve_calls == 1 and not rec["add_noise"], (key, randn_calls, retrieve_calls, len(rec["add_noise"]))
            assert torch.equal(rec["start"], noise * sched.init_noise_sigma), f"{key}: start != noise * init_noise_sigma"
            start_desc = f"noise * init_noise_sigma ({init_sigma!r})"
        else:
            # two encodes (init image for the start, masked image), one noise draw, one add_noise.
            assert randn_calls == 1 and retrieve_calls == 2 and len(rec["add_noise"]) == 1, (key, randn_calls, retrieve_calls, len(rec["add_noise"]))
            orig, n_used, t_used = rec["add_noise"][0]
            assert torch.equal(n_used, noise)
            c["image_latents_vs_posterior_mean_max_abs"] = float((orig - ref_image_latents).abs().max())
            assert c["image_latents_vs_posterior_mean_max_abs"] < 1e-5, (key, c)
            assert float(t_used[0]) == rec["t"][0], (t_used, rec["t"])
            assert torch.equal(rec["start"], orig_add_noise(orig, noise, t_used)), key
            shared_il = shared.setdefault("image_latents", orig)
            assert torch.equal(shared_il, orig)
            start_desc = f"scheduler.add_noise(image_latents, noise, timesteps[:1] = [{rec['t'][0]:g}]) (no init_noise_sigma factor)"
        # the first U-Net call: [scale_model_input(cat([start]*2)), mask, masked_image_latents]
        scaled = torch.cat([rec["start"]] * 2)
        if sname == "euler":
            sigma0 = float(sched.sigmas[t_start])
            c["euler_sigma0"] = sigma0
            scaled = torch.cat([rec["start"]] * 2) / (sigma0**2 + 1) ** 0.5
        ref_in = torch.cat([scaled, torch.cat([m1] * 2), torch.cat([l1] * 2)], dim=1)
        c["unet_input_vs_recomputed_max_abs"] = float((rec["unet_in"] - ref_in).abs().max())
        assert c["unet_input_vs_recomputed_max_abs"] < 1e-6, (key, c)
        assert rec["unet_in"].shape == (2, 9, lat, lat) and rec["unet_out"].shape == (2, 4, lat, lat)
        assert float(rec["unet_t"].reshape(-1)[0]) == rec["t"][0]
        final = rec["steps"][-1]
        manual = (vae.decode(final / sf).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
        c["image_vs_manual_decode_max_abs"] = float((manual - np_image).abs().max())
        assert c["image_vs_manual_decode_max_abs"] < 1e-5, (key, c)
        c["unet_out_std"] = float(rec["unet_out"].std())
        c["final_latents_std"] = float(final.std())
        c["randn_tensor_calls"], c["retrieve_latents_calls"], c["add_noise_calls"] = randn_calls, retrieve_calls, len(rec["add_noise"])
        checks[key] = c

        put(f"{key}/start", rec["start"], f"f32 [1,4,8,8]: latents prepare_latents returned = {start_desc}")
        put(f"{key}/latents", torch.stack(rec["steps"], 0), f"f32 [{n_run},1,4,8,8]: latents after every step (callback_on_step_end)")
        put(f"{key}/final_latents", final, "f32 [1,4,8,8]: latents after the last step (= latents[-1]; what the VAE decodes, / scaling_factor)")
        put(f"{key}/image", np_image, "f32 [64,64,3] in [0,1]: pipe(..., output_type='np').images[0] = (vae.decode(final/sf)/2+0.5).clamp(0,1), HWC")
        put(f"{key}/unet_input", rec["unet_in"], f"f32 [2,9,8,8]: first U-Net call's sample = cat([scale_model_input(cat([start]*2), t0), cat([mask_latent]*2), cat([masked_image_latents]*2)], dim=1); batch [uncond, cond]; t0 = {rec['t'][0]:g}")
        put(f"{key}/unet_output", rec["unet_out"], "f32 [2,4,8,8]: first U-Net call's raw output (batch [uncond, cond], before CFG)")
        put(f"{key}/timesteps", torch.tensor(rec["t"], dtype=torch.float32), f"f32 [{n_run}]: the timesteps run (timesteps[t_start:])")
        cases.append(
            {
                "key": key,
                "scheduler": sname,
                "class": type(sched).__name__,
                "num_inference_steps": steps_n,
                "strength": strength,
                "init_timestep": init_timestep,
                "t_start": t_start,
                "steps_run": n_run,
                "all_timesteps": [float(t) for t in sched.timesteps],
                "timesteps": rec["t"],
                "sigmas": [float(s) for s in sched.sigmas] if sname == "euler" else None,
                "init_noise_sigma": init_sigma,
                "latents_argument": "noise" if strength == 1.0 else None,
                "start": start_desc,
                "per_step_blending": False,
            }
        )
        print(f"{key}: {n_run} steps at {rec['t']}, init_noise_sigma {init_sigma:.4f}, unet_out std {c['unet_out_std']:.3f}, image mean {float(np_image.mean()):.4f}", file=sys.stderr)

    put("mask_latent", shared["mask_latent"], "f32 [1,1,8,8] in {0,1}: F.interpolate(mask_condition = (mask >= 0.5) [1,1,64,64], size=(8,8)) (mode 'nearest') = mask_condition[..., ::8, ::8] (the top-left pixel of each 8x8 cell); identical in every case")
    put("masked_image", shared["masked_image"], "f32 [1,3,64,64] in [-1,1]: (2*image-1) * (mask_condition < 0.5) = (2*image-1) * (mask < 0.5): repainted pixels become 0 (mid gray), kept pixels keep their value; what the VAE encodes; identical in every case")
    put("masked_image_latents", shared["masked_image_latents"], "f32 [1,4,8,8]: vae.encode(masked_image).latent_dist.mean * scaling_factor (posterior mean, pinned); identical in every case")
    put("image_latents", shared["image_latents"], "f32 [1,4,8,8]: vae.encode(2*image-1).latent_dist.mean * scaling_factor (the unmasked init image; posterior mean, pinned): what strength < 1 noises")

    # ---------------------------------------------------------------- write
    st_path = os.path.join(out_dir, "golden.safetensors")
    safetensors.torch.save_file(out, st_path, metadata={"generator": "tools/make_inpaint_golden.py"})
    mp = base.mask_processor.config
    info = {
        "generator": "tools/make_inpaint_golden.py",
        "description": "StableDiffusionInpaintPipeline (9-channel U-Net) on tests/fixtures/inpaint/model with the VAE "
        "posterior mean (the module's retrieve_latents forced to sample_mode='argmax') and given noise "
        "(latents=noise for strength 1; the module's randn_tensor replaced for strength < 1).",
        "model_dir": "tests/fixtures/inpaint/model",
        "reused_from": "models/tiny-random: text_encoder, tokenizer, vae, scheduler (byte-identical files; vae/latent_preview.json not copied)",
        "restored_after_save_pretrained": restored,
        "unet": {
            "config_changes_vs_tiny_random": {"in_channels": [4, 9], "block_out_channels": [[32, 64], UNET_BLOCK_OUT_CHANNELS]},
            "why_narrower": "at block_out_channels [32, 64] the 9-channel U-Net is 3.2 MB and the fixture must stay under 2 MiB",
            "weight_perturbation": "torch.manual_seed(unet_init) init; make_golden.perturb(unet, perturb_unet): norm weights 1+0.1*randn, biases 0.1*randn, all-zero weights +0.05*randn; then conv_out.weight *= unet_conv_out_gain",
            "unet_conv_out_gain": UNET_CONV_OUT_GAIN,
            "perturb_counts": perturb_stats,
            "parameters": sum(p.numel() for p in unet.parameters()),
        },
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT,
        "guidance_scale": GUIDANCE,
        "eta": 0.0,
        "height": SIZE,
        "width": SIZE,
        "seeds": SEEDS,
        "vae_scaling_factor": sf,
        "vae_scale_factor": base.vae_scale_factor,
        "inputs": {
            "image.png": "64x64 RGB; the pipeline is given PIL.Image.open(image.png)",
            "mask.png": "64x64 8-bit 'L'; the pipeline is given PIL.Image.open(mask.png). 255 = repaint, 0 = keep",
            "mask_rect_y0_y1_x0_x1_exclusive": list(MASK_RECT),
            "mask_circle_cx_cy_r_ring": list(MASK_CIRCLE),
            "mask_ring": "pixels with r < dist <= r+ring: 128 where y < cy (binarises to 1), 127 where y >= cy (binarises to 0)",
            "mask_pixel_counts": {str(v): int((mask_image() == v).sum()) for v in (0, 127, 128, 255)},
        },
        "image_preprocessing": {
            "image_processor": public_config(base.image_processor.config),
            "rule": "PIL RGB -> resize to (64,64) (a no-op at 64x64: PIL returns a copy for the same size) -> float32 /255 -> 2x-1 ([-1,1]); no binarisation",
        },
        "mask_preprocessing": {
            "mask_processor": public_config(mp),
            "rule": "PIL -> resize to (64,64) (no-op) -> convert('L') (do_convert_grayscale) -> float32 /255 -> NO normalisation -> "
            "binarize: x < 0.5 -> 0, x >= 0.5 -> 1 (so 8-bit 127 -> keep, 128 -> repaint) = mask_condition [1,1,64,64]",
            "masked_image": "init_image_[-1,1] * (mask_condition < 0.5): repainted pixels are set to 0 (mid gray in [-1,1]), not -1",
            "to_latent_grid": "prepare_mask_latents: torch.nn.functional.interpolate(mask_condition, size=(64//8, 64//8)) with the default "
            "mode 'nearest' (source index floor(dst * 8) = 8*dst): mask_latent[i, j] = mask_condition[8i, 8j], the top-left pixel of each "
            "8x8 cell; no averaging, no re-binarisation needed (values stay 0/1). Done after binarisation.",
            "masked_image_encoding": "_encode_vae_image(masked_image) = retrieve_latents(vae.encode(masked_image)) * scaling_factor; "
            "diffusers samples the posterior with the generator; pinned here to the mean (sample_mode='argmax')",
        },
        "unet_input": {
            "channel_order": [
                "0..3: scheduler.scale_model_input(latents, t) (DDIM: identity; Euler: latents / sqrt(sigma^2 + 1))",
                "4: mask_latent (not scaled)",
                "5..8: masked_image_latents (already * scaling_factor, not scaled by scale_model_input)",
            ],
            "code": "latent_model_input = scheduler.scale_model_input(cat([latents]*2), t); cat([latent_model_input, mask, masked_image_latents], dim=1)",
            "batch": "CFG batch [uncond, cond]; mask and masked_image_latents are repeated for both halves",
            "output": "out_channels 4 (epsilon); CFG uncond + guidance*(cond - uncond); scheduler.step on the 4-channel latents",
        },
        "strength": {
            "schedule": "get_timesteps: init_timestep = min(int(steps*strength), steps), t_start = steps - init_timestep, run timesteps[t_start:], set_begin_index(t_start)",
            "start_strength_1": "latents = noise * init_noise_sigma (whether given as latents= or drawn); the image only enters through the mask channels",
            "start_strength_lt_1": "latents = scheduler.add_noise(image_latents, noise, timesteps[:1]) with image_latents = the unmasked init image's encoding * scaling_factor; "
            "only when latents=None: with latents= given diffusers 0.42.1 ignores the image (latents = given * init_noise_sigma)",
            "per_step_blending": "none for a 9-channel U-Net (the (1-mask)*noised_init + mask*latents blend after each step is the 4-channel path only); checked: add_noise calls per case",
        },
        "tensors": {
            name: {"shape": list(t.shape), "dtype": "float32", "description": desc[name], "mean": float(t.double().mean()), "std": float(t.double().std()) if t.numel() > 1 else 0.0}
            for name, t in out.items()
        },
        "tolerance": "suggested: relative L2 <= 1e-4 per step; image PSNR >= 40 dB",
        "cases": cases,
        "checks": checks,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "device": "cpu",
        "dtype": "float32",
    }
    json_path = os.path.join(out_dir, "golden.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # safetensors creates files 0600; make everything we wrote world-readable like the rest.
    for d, _, fs in os.walk(out_dir):
        for name in fs:
            os.chmod(os.path.join(d, name), 0o644)
    total = make_golden.folder_size(out_dir)
    for name, t in out.items():
        print(f"  {name:28s} {str(list(t.shape)):18s} std={info['tensors'][name]['std']:.4f}", file=sys.stderr)
    print(f"model folder {make_golden.folder_size(model_dir)} B, golden.safetensors {os.path.getsize(st_path)} B, total {total} B", file=sys.stderr)
    if total >= MAX_BYTES:
        print(f"WARNING: tests/fixtures/inpaint is not under {MAX_BYTES} bytes", file=sys.stderr)
        sys.exit(1)
    bad = [k for k, c in checks.items() if not 0.3 <= c["unet_out_std"] <= 3.0]
    if bad:
        print(f"WARNING: unet_out std outside [0.3, 3] for {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
