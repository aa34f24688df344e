#!/usr/bin/env python3
"""Golden fixture for Veil's schedulers, produced by diffusers itself (the independent reference).

For each scheduler (DDIM, DPM-Solver++ 2M, Euler) and each scheduler config below, and each
num_inference_steps in STEPS, this runs the standard denoising loop

    x = latents * init_noise_sigma
    for i, t in enumerate(timesteps):
        x_in = scale_model_input(x, t)
        eps  = fake_model(x_in, t)      # 0.3 * tanh(x_in) + 0.1 * sin(t / 100) * fixed_noise
        x    = step(eps, t, x)

with a deterministic fake model, and saves the timesteps and the sample after every step. It also
saves `add_noise` at the middle step and the timesteps alone for a sweep of step counts (cheap, and
the timestep rounding rules are where ports usually go wrong).

Writes tests/fixtures/golden/schedulers.safetensors and tests/fixtures/golden/schedulers.json.
core/tests/scheduler_golden.rs replays the same loop with veil-core and compares.

Usage: python3 tools/make_scheduler_golden.py
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
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "golden")

SHAPE = [1, 4, 8, 8]
LATENT_SEED = 1234
NOISE_SEED = 5678
STEPS = [1, 3, 10]
# Step counts for the timesteps-only sweep. 61, 103 and 121 are counts where numpy's float `arange`
# (trailing spacing) returns n + 1 elements, the extra one becoming timestep -1.
SWEEP_STEPS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 25, 30, 40, 50, 61, 100, 103, 121, 200]

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim. No timestep_spacing:
# each scheduler falls back to its own diffusers default (DDIM leading, DPM/Euler linspace).
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
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json, verbatim (v-prediction, also
# no timestep_spacing).
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

CONFIGS = {
    "sd15": SD15,
    "sd21": SD21,
    "sd21_trailing": {**SD21, "timestep_spacing": "trailing"},
    "sd15_leading": {**SD15, "timestep_spacing": "leading"},
    "sd15_linspace": {**SD15, "timestep_spacing": "linspace"},
    # Everything else: cosine betas, x0 ("sample") prediction, set_alpha_to_one and clip_sample
    # left at their DDIM defaults (True) with a clip range the fake model actually hits.
    "cosine_sample": {
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "sample",
        "clip_sample_range": 0.2,
        "num_train_timesteps": 1000,
    },
    "linear_eps_trailing": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "timestep_spacing": "trailing",
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "clip_sample": False,
    },
}
SWEEP_CONFIGS = ["sd15", "sd15_leading", "sd15_linspace", "sd21_trailing"]
# Loop cases that would only repeat another case (the explicit spacing equals that scheduler's
# default) are skipped to keep the fixture small.
SKIP = {("ddim", "sd15_leading"), ("dpm++2m", "sd15_linspace"), ("euler", "sd15_linspace")}
# add_noise is only recorded for this step count.
ADD_NOISE_STEPS = 10


def fake_model(x_in: torch.Tensor, t: float, fixed_noise: torch.Tensor) -> torch.Tensor:
    return 0.3 * torch.tanh(x_in) + (0.1 * math.sin(float(t) / 100.0)) * fixed_noise


def make(cls, cfg):
    # from_config, like a pipeline swapping schedulers: keys the class lacks are ignored and
    # missing keys take that class's defaults.
    return cls.from_config(cfg)


def main() -> None:
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(LATENT_SEED)
    latents = torch.randn(SHAPE, generator=g, dtype=torch.float32)
    g = torch.Generator().manual_seed(NOISE_SEED)
    fixed_noise = torch.randn(SHAPE, generator=g, dtype=torch.float32)

    tensors = {"latents": latents.contiguous(), "fixed_noise": fixed_noise.contiguous()}
    cases = []
    for sname, cls in SCHEDULERS.items():
        for cname, cfg in CONFIGS.items():
            if (sname, cname) in SKIP:
                continue
            for n in STEPS:
                sched = make(cls, cfg)
                sched.set_timesteps(n)
                timesteps = sched.timesteps.clone()
                init_sigma = float(sched.init_noise_sigma)
                x = latents * sched.init_noise_sigma
                samples = []
                for t in timesteps:
                    x_in = sched.scale_model_input(x, t)
                    eps = fake_model(x_in, t.item(), fixed_noise)
                    x = sched.step(eps, t, x).prev_sample
                    samples.append(x)
                key = f"{sname}/{cname}/n{n}"
                tensors[f"{key}/timesteps"] = timesteps.to(torch.float64).contiguous()
                tensors[f"{key}/samples"] = torch.stack(samples).to(torch.float32).contiguous()

                # add_noise at the middle step, on a freshly set-up scheduler (no step taken).
                k = len(timesteps) // 2
                if n == ADD_NOISE_STEPS:
                    sched = make(cls, cfg)
                    sched.set_timesteps(n)
                    noisy = sched.add_noise(latents, fixed_noise, sched.timesteps[k : k + 1])
                    tensors[f"{key}/add_noise"] = noisy.to(torch.float32).contiguous()
                cases.append(
                    {
                        "scheduler": sname,
                        "config": cname,
                        "num_inference_steps": n,
                        "init_noise_sigma": init_sigma,
                        "add_noise_step_index": k if n == ADD_NOISE_STEPS else None,
                        "key": key,
                        "timesteps": [float(t) for t in timesteps],
                    }
                )

    sweep = []
    for sname, cls in SCHEDULERS.items():
        for cname in SWEEP_CONFIGS:
            for n in SWEEP_STEPS:
                sched = make(cls, CONFIGS[cname])
                sched.set_timesteps(n)
                key = f"sweep/{sname}/{cname}/n{n}"
                # f32 holds every value exactly: DDIM/DPM timesteps are small ints, Euler's are f32.
                tensors[key] = sched.timesteps.to(torch.float32).contiguous()
                sweep.append({"scheduler": sname, "config": cname, "num_inference_steps": n, "key": key})

    os.makedirs(OUT_DIR, exist_ok=True)
    st_path = os.path.join(OUT_DIR, "schedulers.safetensors")
    save_file(tensors, st_path)
    meta = {
        "description": "Scheduler golden fixture generated by tools/make_scheduler_golden.py with diffusers as the reference. "
        "Replayed by core/tests/scheduler_golden.rs.",
        "loop": "x = latents * init_noise_sigma; for t in timesteps: x_in = scale_model_input(x, t); "
        "eps = 0.3 * tanh(x_in) + 0.1 * sin(t / 100) * fixed_noise; x = step(eps, t, x)",
        "shape": SHAPE,
        "latent_seed": LATENT_SEED,
        "noise_seed": NOISE_SEED,
        "tensors": {
            "latents": "f32 SHAPE, torch.randn with torch.Generator().manual_seed(latent_seed)",
            "fixed_noise": "f32 SHAPE, torch.randn with torch.Generator().manual_seed(noise_seed)",
            "<scheduler>/<config>/n<steps>/timesteps": "f64 [len], scheduler.timesteps after set_timesteps",
            "<scheduler>/<config>/n<steps>/samples": "f32 [len, *SHAPE], the sample after every step",
            "<scheduler>/<config>/n<steps>/add_noise": "f32 SHAPE, add_noise(latents, fixed_noise, timesteps[add_noise_step_index])",
            "sweep/<scheduler>/<config>/n<steps>": "f32 [len], timesteps only",
        },
        "tolerance": "relative L2 <= 1e-5 per step; timesteps exact",
        "schedulers": {k: v.__name__ for k, v in SCHEDULERS.items()},
        "configs": CONFIGS,
        "steps": STEPS,
        "add_noise_steps": ADD_NOISE_STEPS,
        "skipped": sorted(f"{a}/{b}" for a, b in SKIP),
        "sweep_steps": SWEEP_STEPS,
        "sweep_configs": SWEEP_CONFIGS,
        "cases": cases,
        "sweep": sweep,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    with open(os.path.join(OUT_DIR, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {st_path} ({os.path.getsize(st_path)} bytes), {len(cases)} cases, {len(sweep)} sweeps", file=sys.stderr)


if __name__ == "__main__":
    main()
