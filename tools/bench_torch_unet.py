#!/usr/bin/env python3
"""Time one U-Net forward pass in PyTorch (CPU, float32) as a baseline for the Rust/candle port.

Cases
  tiny     models/tiny-random/unet, batch 2, latent 16x16, context [2,77,32]
  tiny-32  same model, latent 32x32
  sd15-32  SD1.5 U-Net (models/configs/sd15/unet/config.json, random weights), batch 2,
           latent 32x32 (256x256 image), context [2,77,768]
  sd15-64  same, latent 64x64 (512x512 image)

Each case runs in a fresh subprocess so that its peak RSS (getrusage ru_maxrss) is its own.
Settings: torch.set_num_threads(--threads, default 2), torch.inference_mode(), 1 warm-up run,
then the median of --runs timed runs.  One JSON line per case on stdout.

Usage:
  python3 tools/bench_torch_unet.py --case tiny --runs 5
  python3 tools/bench_torch_unet.py --case sd15-32 --case sd15-64 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CASES = {
    "tiny": {"model": "models/tiny-random/unet", "latent": 16, "ctx_dim": 32},
    "tiny-32": {"model": "models/tiny-random/unet", "latent": 32, "ctx_dim": 32},
    "sd15-32": {"config": "models/configs/sd15/unet/config.json", "latent": 32, "ctx_dim": 768},
    "sd15-64": {"config": "models/configs/sd15/unet/config.json", "latent": 64, "ctx_dim": 768},
}
BATCH = 2
CTX_LEN = 77
TIMESTEP = 500


def _rss_mib_now() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(case: str, runs: int, threads: int) -> dict:
    import resource
    import statistics
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    spec = CASES[case]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if "model" in spec:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, spec["model"]), torch_dtype=torch.float32)
    else:
        with open(os.path.join(ROOT, spec["config"])) as f:
            cfg = json.load(f)
        unet = UNet2DConditionModel.from_config(cfg)  # default (random) init, float32
    unet = unet.to(torch.float32).eval()
    load_s = time.perf_counter() - t0
    rss_after_load = _rss_mib_now()

    g = torch.Generator().manual_seed(0)
    lat = spec["latent"]
    sample = torch.randn(BATCH, unet.config.in_channels, lat, lat, generator=g)
    context = torch.randn(BATCH, CTX_LEN, spec["ctx_dim"], generator=g)
    t = torch.tensor([TIMESTEP], dtype=torch.int64)

    times = []
    with torch.inference_mode():
        out = unet(sample, t, encoder_hidden_states=context).sample  # warm-up
        for _ in range(runs):
            s = time.perf_counter()
            out = unet(sample, t, encoder_hidden_states=context).sample
            times.append(time.perf_counter() - s)
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return {
        "case": case,
        "seconds_median": statistics.median(times),
        "seconds_min": min(times),
        "seconds_all": [round(x, 4) for x in times],
        "runs": runs,
        "warmup": 1,
        "threads": threads,
        "batch": BATCH,
        "latent": [lat, lat],
        "context": [BATCH, CTX_LEN, spec["ctx_dim"]],
        "params": sum(p.numel() for p in unet.parameters()),
        "peak_rss_mib": round(maxrss_kib / 1024.0, 1),
        "rss_after_load_mib": round(rss_after_load, 1),
        "load_seconds": round(load_s, 3),
        "out_shape": list(out.shape),
        "out_std": float(out.std()),
        "attn_processors": procs,
        "dtype": "float32",
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", choices=list(CASES) + ["all"], help="repeatable; default tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.case or ["tiny"]
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
