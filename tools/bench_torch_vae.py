#!/usr/bin/env python3
"""Time the VAE decoder and the CLIP text encoder in PyTorch (CPU, float32) as baselines for
`veil bench vae` and `veil bench clip`.

Cases
  vae-sd15-64  SD1.5 VAE (models/configs/sd15/vae/config.json, random weights),
               vae.decode of latents [1,4,64,64] -> a 512x512 image
  vae-sd15-32  same, latents [1,4,32,32] -> 256x256
  vae-sd15-8   same, latents [1,4,8,8] -> 64x64 (a smoke test)
  clip-sd15    SD1.5 text encoder (transformers CLIPTextModel from
               models/configs/sd15/text_encoder/config.json, random weights), token ids [2,77]

The VAE's encoder and quant_conv are dropped before timing (decode does not use them), so that
the peak RSS is that of the decoder, as in `veil bench vae`.  The reported params are those of
what runs: post_quant_conv + decoder, or the whole text model.

Each case runs in a fresh subprocess so that its peak RSS (getrusage ru_maxrss) is its own.
Settings: torch.set_num_threads(--threads, default 2), torch.inference_mode(), 1 warm-up run,
then the median of --runs timed runs.  One JSON line per case on stdout.

Usage:
  python3 tools/bench_torch_vae.py --case vae-sd15-8 --runs 1
  python3 tools/bench_torch_vae.py --case vae-sd15-64 --case clip-sd15 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
VAE_CONFIG = "models/configs/sd15/vae/config.json"
CLIP_CONFIG = "models/configs/sd15/text_encoder/config.json"
CASES = {
    "vae-sd15-64": {"kind": "vae", "config": VAE_CONFIG, "batch": 1, "latent": 64},
    "vae-sd15-32": {"kind": "vae", "config": VAE_CONFIG, "batch": 1, "latent": 32},
    "vae-sd15-8": {"kind": "vae", "config": VAE_CONFIG, "batch": 1, "latent": 8},
    "clip-sd15": {"kind": "clip", "config": CLIP_CONFIG, "batch": 2, "tokens": 77},
}


def _rss_mib_now() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _build_vae(spec: dict):
    import torch
    from diffusers import AutoencoderKL

    with open(os.path.join(ROOT, spec["config"])) as f:
        cfg = json.load(f)
    vae = AutoencoderKL.from_config(cfg).to(torch.float32).eval()  # default (random) init
    vae.encoder = None  # decode uses post_quant_conv + decoder only
    vae.quant_conv = None
    g = torch.Generator().manual_seed(1)
    lat = spec["latent"]
    latents = torch.randn(spec["batch"], vae.config.latent_channels, lat, lat, generator=g)
    procs = sorted({type(p).__name__ for p in vae.attn_processors.values()})
    info = {"latent": [lat, lat], "input_shape": list(latents.shape), "attn_processors": procs}
    return vae, (lambda: vae.decode(latents).sample), info


def _build_clip(spec: dict):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.from_json_file(os.path.join(ROOT, spec["config"]))
    model = CLIPTextModel(cfg).to(torch.float32).eval()  # default (random) init
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (spec["batch"], spec["tokens"]), generator=g)
    info = {
        "input_shape": list(ids.shape),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }
    return model, (lambda: model(input_ids=ids).last_hidden_state), info


def worker(case: str, runs: int, threads: int) -> dict:
    import resource
    import statistics
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(threads)
    spec = CASES[case]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    build = _build_vae if spec["kind"] == "vae" else _build_clip
    model, call, info = build(spec)
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_mib_now()

    times = []
    with torch.inference_mode():
        w = time.perf_counter()
        out = call()  # warm-up
        warmup_s = time.perf_counter() - w
        print(f"{case}: warm-up {warmup_s:.3f} s", file=sys.stderr, flush=True)
        for i in range(runs):
            s = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - s)
            print(f"{case}: run {i + 1}/{runs} {times[-1]:.3f} s", file=sys.stderr, flush=True)
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "case": case,
        "seconds_median": statistics.median(times),
        "seconds_min": min(times),
        "seconds_all": [round(x, 4) for x in times],
        "runs": runs,
        "warmup": 1,
        "warmup_seconds": round(warmup_s, 4),
        "threads": threads,
        **info,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_rss_mib": round(maxrss_kib / 1024.0, 1),
        "rss_after_load_mib": round(rss_after_load, 1),
        "load_seconds": round(load_s, 3),
        "out_shape": list(out.shape),
        "out_std": float(out.std()),
        "dtype": "float32",
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES) + ["all"], help="repeatable; default vae-sd15-8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    cases = args.case or ["vae-sd15-8"]
    if "all" in cases:
        cases = list(CASES)

    if args.worker:
        print(json.dumps(worker(cases[0], args.runs, args.threads)), flush=True)
        return

    rc = 0
    for case in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--case", case, "--runs", str(args.runs), "--threads", str(args.threads)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        if p.returncode != 0 or not line.startswith("{"):
            print(json.dumps({"case": case, "error": f"worker exited {p.returncode}"}), flush=True)
            rc = 1
        else:
            print(line, flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
