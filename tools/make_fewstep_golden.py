#!/usr/bin/env python3
"""Golden fixture for Veil's stochastic few-step schedulers, produced by diffusers itself.

Euler Ancestral (`EulerAncestralDiscreteScheduler`; trailing, leading and linspace spacing,
epsilon and v-prediction) and LCM (`LCMScheduler`; original_inference_steps 50 and 100, epsilon,
v-prediction and sample prediction, with and without clipping) run the same loop as
tools/make_scheduler_golden.py,

    x = latents * init_noise_sigma
    for i, t in enumerate(timesteps):
        x_in = scale_model_input(x, t)
        eps  = fake_model(x_in, t)      # 0.3 * tanh(x_in) + 0.1 * sin(t / 100) * fixed_noise
        x    = step(eps, t, x, generator=g)

and, because both samplers draw fresh noise inside `step`, also record the noise diffusers drew
at every step (the schedulers' module-level `randn_tensor` is wrapped to keep what it returns).
core/tests/scheduler_golden.rs replays each loop with veil-core, feeding that noise through
`ReplayStepNoise`, and compares every step.

Writes tests/fixtures/golden/fewstep_schedulers.safetensors and fewstep_schedulers.json.

Usage: /work/venv/bin/python tools/make_fewstep_golden.py
"""

import json
import math
import os
import platform
import sys

import numpy as np
import torch
import diffusers
import safetensors
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import diffusers.schedulers.scheduling_lcm as lcm_module
from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "golden")

SHAPE = [1, 4, 8, 8]
# The same latents and fixed noise as schedulers.safetensors.
LATENT_SEED = 1234
NOISE_SEED = 5678
# The generator passed to every `step`.
STEP_NOISE_SEED = 4321
ADD_NOISE_STEPS = 4

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (as in make_scheduler_golden.py).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 (v-prediction).
SD21 = {
    **SD15,
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "prediction_type": "v_prediction",
}
# An LCM config with every LCMScheduler key set (the shape of a distilled LCM checkpoint's).
LCM = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

CONFIGS = {
    # SD-Turbo's sampling: Euler Ancestral with trailing spacing on the SD scheduler config.
    "turbo_trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd15_leading": {**SD15, "timestep_spacing": "leading"},
    # No timestep_spacing: Euler Ancestral's default, linspace.
    "sd15": SD15,
    "sd21_trailing": {**SD21, "timestep_spacing": "trailing"},
    "lcm": LCM,
    "lcm_orig100": {**LCM, "original_inference_steps": 100},
    # LCM-LoRA style: LCMScheduler.from_config of the base model's scheduler config.
    "lcm_from_sd15": SD15,
    # Missing clip_sample (LCM's default is False), v-prediction, another timestep_scaling.
    "lcm_minimal_v": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "timestep_scaling": 5.0,
    },
    # x0 prediction clipped to a range the fake model hits.
    "lcm_sample_clip": {**LCM, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.2},
}

# (scheduler, config, step counts)
CASES = [
    ("euler-a", "turbo_trailing", [1, 2, 4, 8]),
    ("euler-a", "sd15_leading", [1, 2, 4]),
    ("euler-a", "sd15", [4]),
    ("euler-a", "sd21_trailing", [1, 2, 4]),
    ("lcm", "lcm", [1, 2, 4, 8]),
    ("lcm", "lcm_orig100", [1, 2, 4]),
    ("lcm", "lcm_from_sd15", [4]),
    ("lcm", "lcm_minimal_v", [4]),
    ("lcm", "lcm_sample_clip", [4]),
]

SCHEDULERS = {"euler-a": EulerAncestralDiscreteScheduler, "lcm": LCMScheduler}

# What randn_tensor returned inside the schedulers' `step`, in order.
DRAWN = []


def recording(original):
    def randn_tensor(*args, **kwargs):
        t = original(*args, **kwargs)
        DRAWN.append(t.clone())
        return t

    return randn_tensor


euler_a_module.randn_tensor = recording(euler_a_module.randn_tensor)
lcm_module.randn_tensor = recording(lcm_module.randn_tensor)


def fake_model(x_in: torch.Tensor, t: float, fixed_noise: torch.Tensor) -> torch.Tensor:
    return 0.3 * torch.tanh(x_in) + (0.1 * math.sin(float(t) / 100.0)) * fixed_noise


def run_case(sname, cname, n, latents, fixed_noise, tensors):
    cls = SCHEDULERS[sname]
    sched = cls.from_config(CONFIGS[cname])
    sched.set_timesteps(n)
    timesteps = sched.timesteps.clone()
    init_sigma = float(sched.init_noise_sigma)
    g = torch.Generator().manual_seed(STEP_NOISE_SEED)
    x = latents * sched.init_noise_sigma
    samples, noise_steps = [], []
    key = f"{sname}/{cname}/n{n}"
    for i, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)
        eps = fake_model(x_in, t.item(), fixed_noise)
        DRAWN.clear()
        x = sched.step(eps, t, x, generator=g).prev_sample
        assert len(DRAWN) <= 1, f"{key} step {i} drew {len(DRAWN)} times"
        if DRAWN:
            tensors[f"{key}/noise/{i}"] = DRAWN[0].to(torch.float32).contiguous()
            noise_steps.append(i)
        samples.append(x)
    tensors[f"{key}/timesteps"] = timesteps.to(torch.float64).contiguous()
    tensors[f"{key}/samples"] = torch.stack(samples).to(torch.float32).contiguous()
    k = len(timesteps) // 2
    if n == ADD_NOISE_STEPS:
        sched = cls.from_config(CONFIGS[cname])
        sched.set_timesteps(n)
        noisy = sched.add_noise(latents, fixed_noise, sched.timesteps[k : k + 1])
        tensors[f"{key}/add_noise"] = noisy.to(torch.float32).contiguous()
    return {
        "scheduler": sname,
        "class": cls.__name__,
        "config": cname,
        "num_inference_steps": n,
        "init_noise_sigma": init_sigma,
        "add_noise_step_index": k if n == ADD_NOISE_STEPS else None,
        "noise_steps": noise_steps,
        "key": key,
        "timesteps": [float(t) for t in timesteps],
    }


def main() -> None:
    torch.set_grad_enabled(False)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(LATENT_SEED), dtype=torch.float32)
    fixed_noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=torch.float32)
    tensors = {"latents": latents.contiguous(), "fixed_noise": fixed_noise.contiguous()}
    cases = [
        run_case(sname, cname, n, latents, fixed_noise, tensors)
        for sname, cname, steps in CASES
        for n in steps
    ]
    os.makedirs(OUT_DIR, exist_ok=True)
    st_path = os.path.join(OUT_DIR, "fewstep_schedulers.safetensors")
    save_file(tensors, st_path)
    meta = {
        "description": "Few-step stochastic scheduler golden fixture generated by tools/make_fewstep_golden.py "
        "with diffusers as the reference. Replayed by core/tests/scheduler_golden.rs.",
        "loop": "x = latents * init_noise_sigma; for t in timesteps: x_in = scale_model_input(x, t); "
        "eps = 0.3 * tanh(x_in) + 0.1 * sin(t / 100) * fixed_noise; x = step(eps, t, x, generator=g)",
        "shape": SHAPE,
        "latent_seed": LATENT_SEED,
        "noise_seed": NOISE_SEED,
        "step_noise_seed": STEP_NOISE_SEED,
        "tensors": {
            "latents": "f32 SHAPE, torch.randn with torch.Generator().manual_seed(latent_seed)",
            "fixed_noise": "f32 SHAPE, torch.randn with torch.Generator().manual_seed(noise_seed)",
            "<scheduler>/<config>/n<steps>/timesteps": "f64 [len], scheduler.timesteps after set_timesteps",
            "<scheduler>/<config>/n<steps>/samples": "f32 [len, *SHAPE], prev_sample after every step",
            "<scheduler>/<config>/n<steps>/noise/<i>": "f32 SHAPE, the noise step i drew (steps in noise_steps)",
            "<scheduler>/<config>/n<steps>/add_noise": "f32 SHAPE, add_noise(latents, fixed_noise, timesteps[add_noise_step_index])",
        },
        "tolerance": "relative L2 <= 1e-4 per step; timesteps exact",
        "schedulers": {k: v.__name__ for k, v in SCHEDULERS.items()},
        "configs": CONFIGS,
        "cases": cases,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    with open(os.path.join(OUT_DIR, "fewstep_schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {st_path} ({os.path.getsize(st_path)} bytes), {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
