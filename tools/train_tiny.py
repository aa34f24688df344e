#!/usr/bin/env python3
"""Trains Veil's tiny text-to-image model on the procedural shapes dataset (`veil dataset`).

Writes a diffusers-layout folder that both diffusers and Veil's Rust loader read unchanged:
  vae/               AutoencoderKL, 64x64 RGB <-> 4x16x16 latents (scaling_factor measured)
  text_encoder/      CLIPTextModel, trained with the server U-Net
  tokenizer/         the CLIP BPE tokenizer of models/tiny-random (copied)
  unet/              the server UNet2DConditionModel (2 levels: 16 -> 8 rows, so strict runs N <= 8)
  device_unet/unet/  a smaller device U-Net on the same latents and text states (the obfuscated
                     policy's on-phone model; `--device-model models/tiny-shapes/device_unet`)
  scheduler/         DDIM, SD's betas
  training_log.json  the command, the machine, the time and the loss curves

Recipe (issue 16): the VAE first (object pixels weighted, since objects are a few percent of a
picture); the dataset is then encoded to latents once; the server U-Net, the text encoder and the
device U-Net train together in one loop (the device U-Net reads the text states detached, so only
the server's loss shapes the text encoder) with epsilon prediction, min-SNR-5 loss weights, 10%
empty captions for classifier-free guidance, AdamW with warm-up and cosine decay, and EMA weights,
which are what is saved. Stages can be bounded by seconds instead of steps (`--unet-seconds`): the
step count is then planned from the measured speed of the first steps, so the learning rate still
decays to its floor at the end.

  veil dataset --out .train/data --seed 1 --count 100000 --side 64
  python3 tools/train_tiny.py --pack-to .train/shapes.xz --data .train/data   # one file, ~8 MB
  python3 tools/train_tiny.py --data .train/shapes.xz --out .train/model --device cuda \
      --vae-seconds 100 --unet-seconds 300

Long CPU runs continue in pieces: --vae-from reuses a trained VAE; with --keep-state every
checkpoint writes the training state (weights, EMA, optimiser, step, plan) to OUT/train_state.pt,
which --resume continues exactly; --init-from starts from an earlier output's EMA weights with a
fresh optimiser (how models/tiny-shapes was trained: see its README.md). On a CPU, --latents-cache
keeps the encoded dataset between runs, --train unet continues the server U-Net alone (the text
encoder and device U-Net stay as loaded, so the device U-Net still matches its text states) and
--high-noise-fraction spends part of each batch on the noisiest timesteps, --two-object-weight on
captions that name two objects (where the model's position errors are). One such hour on 2
cores (the model card's "CPU continuation") did not measurably change the model.
"""
import argparse
import hashlib
import json
import lzma
import math
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# data


def pack(folder: Path, out: Path):
    """Pictures (uint8 N x 64 x 64 x 3) and captions of a `veil dataset` folder as one xz file."""
    from PIL import Image
    rows = [json.loads(l) for l in (folder / "captions.jsonl").read_text().splitlines() if l.strip()]
    x = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    head = json.dumps({"shape": list(x.shape), "captions": [r["caption"] for r in rows],
                       "folder": str(folder)}).encode()
    out.write_bytes(lzma.compress(len(head).to_bytes(8, "little") + head + x.tobytes(), preset=6))
    print(f"packed {x.shape[0]} pictures into {out} ({out.stat().st_size / 1e6:.1f} MB)")


def load_data(path: Path):
    """uint8 pictures [N, 3, H, W] and captions, from a pack file or a `veil dataset` folder."""
    if path.is_file():
        raw = lzma.decompress(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        head = json.loads(raw[8:8 + n])
        x = np.frombuffer(raw[8 + n:], dtype=np.uint8).reshape(head["shape"])
        captions = head["captions"]
    else:
        from PIL import Image
        rows = [json.loads(l) for l in (path / "captions.jsonl").read_text().splitlines() if l.strip()]
        x = np.stack([np.asarray(Image.open(path / r["file"]).convert("RGB")) for r in rows])
        captions = [r["caption"] for r in rows]
    return torch.from_numpy(x.copy()).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(x_u8):
    return x_u8.float() / 127.5 - 1.0


def channels(text):
    return tuple(int(c) for c in text.split(",")) if text else ()


# --------------------------------------------------------------------------------------------
# schedule, EMA


def lr_at(step, total, peak, warmup, floor=0.05):
    if step < warmup:
        return peak * (step + 1) / warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return peak * (floor + (1 - floor) * cos)


class Ema:
    """Exponential moving average of a module's parameters (decay warms up from 0)."""

    def __init__(self, module, decay):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in module.parameters()]
        self.count = 0

    @torch.no_grad()
    def update(self, module):
        self.count += 1
        d = min(self.decay, (1 + self.count) / (10 + self.count))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in module.parameters()], 1 - d)

    @torch.no_grad()
    def copy_to(self, module):
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s.to(p.dtype))


class Planner:
    """Total steps: fixed, or planned from the speed of the first `probe` steps and a budget."""

    def __init__(self, steps, seconds, probe=40):
        self.total = steps if steps else 10 ** 9
        self.seconds, self.probe, self.t0 = seconds, probe, None
        self.planned = bool(steps) or not seconds

    def at(self, step, dev):
        if self.planned:
            return
        if step == 5:  # after the first (slow) steps: kernels chosen, memory allocated
            sync(dev)
            self.t0 = time.time()
        elif step == 5 + self.probe:
            sync(dev)
            per = (time.time() - self.t0) / self.probe
            self.total = max(step + 1, int(step + (self.seconds - (time.time() - self.started)) / per))
            self.planned = True
            print(f"planned {self.total} steps ({per * 1000:.1f} ms per step)", flush=True)

    def start(self):
        self.started = time.time()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


CPU_BF16 = False  # --cpu-bf16: bf16 autocast on CPUs with bf16 dot products (AVX512-BF16, AMX)


def autocast(dev):
    if dev.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=CPU_BF16)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")


# --------------------------------------------------------------------------------------------
# VAE


def object_mask(x):
    """Pixels unlike the picture's corner (its background)."""
    return ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()


def vae_metrics(vae, x_u8, dev):
    """Reconstruction PSNR (all pixels, object pixels) of the posterior mean, on x_u8."""
    with torch.no_grad(), autocast(dev):
        x = to_unit(x_u8.to(dev))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    obj = object_mask(x).expand_as(x).bool()
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))
    psnr_obj = float(10 * torch.log10(4.0 / ((rec - x)[obj] ** 2).mean()))
    return psnr, psnr_obj


def train_vae(args, x_all, dev, log, out):
    """Trains the AutoencoderKL on all but the last 512 pictures and saves it under out/vae."""
    from diffusers import AutoencoderKL
    held = x_all[-512:]
    n = x_all.shape[0] - 512
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels(args.vae_channels), layers_per_block=args.vae_layers,
        latent_channels=4, norm_num_groups=args.norm_groups, sample_size=64,
    ).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    plan = Planner(args.vae_steps, args.vae_seconds)
    plan.start()
    curve, t0, step = [], time.time(), 0
    while step < plan.total:
        plan.at(step, dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, plan.total, args.vae_lr, warmup=100)
        x = to_unit(x_all[torch.randint(0, n, (args.vae_batch,), device=x_all.device)].to(dev))
        with autocast(dev):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        wmap = 1.0 + args.object_weight * object_mask(x)
        err = (rec - x) ** 2 + 0.5 * (rec - x).abs()
        rec_loss = (err * wmap).sum() / (wmap.sum() * 3)
        kl = post.kl().float().mean() / (3 * 64 * 64)
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == plan.total - 1:
            curve.append([step, rec_loss.item(), kl.item()])
            print(f"vae {step} rec {rec_loss.item():.4f} kl {kl.item():.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        step += 1
    vae.eval()
    psnr, psnr_obj = vae_metrics(vae, held, dev)
    with torch.no_grad(), autocast(dev):
        zs = torch.cat([vae.encode(to_unit(x_all[i:i + 1024].to(dev))).latent_dist.mean.float()
                        for i in range(0, min(8192, x_all.shape[0]), 1024)])
    scaling = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(out / "vae")
    log["stages"]["vae"] = {
        "steps": step, "batch": args.vae_batch, "seconds": time.time() - t0, "curve": curve,
        "parameters": sum(p.numel() for p in vae.parameters()), "scaling_factor": scaling,
        "heldout_psnr_db": psnr, "heldout_object_psnr_db": psnr_obj,
        "object_weight": args.object_weight}
    print(f"vae done: {step} steps, scaling {scaling:.4f}, held-out PSNR {psnr:.1f} dB, "
          f"on object pixels {psnr_obj:.1f} dB", flush=True)
    return vae


def latents_key(x_all, vae):
    """SHA-256 of the pictures and the VAE's weights: a latents cache is only reused for both."""
    h = hashlib.sha256(x_all.cpu().contiguous().numpy())
    for name, v in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(v.detach().float().cpu().contiguous().numpy())
    return h.hexdigest()


def encode_all(vae, x_all, dev):
    """The whole dataset's latents (posterior means), scaled, once."""
    scaling = vae.config.scaling_factor
    chunk = 1024 if dev.type == "cuda" else 256  # bounded activations on a small CPU machine
    zs, t0 = [], time.time()
    with torch.no_grad(), autocast(dev):
        for i in range(0, x_all.shape[0], chunk):
            zs.append(vae.encode(to_unit(x_all[i:i + chunk].to(dev))).latent_dist.mean.float())
            if (i // chunk) % 50 == 0:
                done = min(i + chunk, x_all.shape[0])
                print(f"encoded {done} pictures ({time.time() - t0:.0f} s)", flush=True)
    return torch.cat(zs) * scaling


# --------------------------------------------------------------------------------------------
# U-Nets


def unet_of(widths, layers, head_dim, args, dev):
    from diffusers import UNet2DConditionModel
    # diffusers' `attention_head_dim` of UNet2DConditionModel is a head *count* (legacy naming);
    # heads `head_dim` wide at every level.
    heads = tuple(max(1, w // head_dim) for w in widths)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths),
        cross_attention_dim=args.text_width, attention_head_dim=heads,
        norm_num_groups=args.norm_groups,
    ).to(dev)


def text_encoder_of(tok, args, dev):
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=args.text_width,
                         intermediate_size=4 * args.text_width, num_hidden_layers=args.text_layers,
                         num_attention_heads=args.text_heads, max_position_embeddings=77,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, projection_dim=args.text_width,
                         hidden_act="quick_gelu")
    return CLIPTextModel(cfg).to(dev)


def min_snr_weights(acp_t, gamma):
    """Min-SNR-gamma loss weights for epsilon prediction (Hang et al. 2023)."""
    snr = acp_t / (1 - acp_t)
    return torch.clamp(snr, max=gamma) / snr


def train_unets(args, nets, latents, ids_all, empty_ids, dev, log, save, pick_weights=None):
    """One loop over the server U-Net + text encoder and the device U-Net (if any); returns the
    loop's state at the end (for `--resume`)."""
    from diffusers import DDPMScheduler
    text, server, device_unet = nets["text"], nets["unet"], nets.get("device_unet")
    acp = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod.to(dev)
    # --train names the networks that learn; the others stay as loaded (a frozen text encoder
    # still conditions the U-Nets; an untrained device U-Net is not run at all)
    trained = {k: m for k, m in nets.items() if k in args.train}
    if device_unet is not None and "device_unet" not in trained:
        device_unet = None
    if "text" not in trained:
        text.eval().requires_grad_(False)
    params = [p for m in trained.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    emas = {k: Ema(m, args.ema) for k, m in trained.items()}
    for m in trained.values():
        m.train()
    plan = Planner(args.unet_steps, args.unet_seconds)
    plan.start()
    n, b = latents.shape[0], args.batch
    curves = {k: [] for k in ("unet", "device_unet") if k in trained}
    smooth, t0, last_save, step = {}, time.time(), time.time(), 0
    if args.resume:
        state = torch.load(args.resume, map_location=dev)
        for k, m in trained.items():
            m.load_state_dict(state["weights"][k])
            emas[k].shadow, emas[k].count = state["ema"][k], state["ema_count"]
        opt.load_state_dict(state["optimiser"])
        step, curves = state["step"], state["curves"]
        plan.total, plan.planned = state["total"], True
        print(f"resumed at step {step} of {plan.total}", flush=True)

    def state():
        return {"weights": {k: m.state_dict() for k, m in trained.items()},
                "ema": {k: e.shadow for k, e in emas.items()},
                "ema_count": next(iter(emas.values())).count,
                "optimiser": opt.state_dict(), "step": step, "total": plan.total, "curves": curves}
    while step < plan.total:
        plan.at(step, dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, plan.total, args.lr, warmup=args.warmup)
        if pick_weights is None:
            idx = torch.randint(0, n, (b,), device=dev)
        else:  # some captions drawn more often than others (--two-object-weight)
            idx = torch.multinomial(pick_weights, b, replacement=True)
        z0, ids = latents[idx], ids_all[idx]
        drop = torch.rand(b, device=dev) < 0.1
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
        t = torch.randint(0, 1000, (b,), device=dev)
        if args.high_noise_fraction > 0:  # part of each batch from the noisiest timesteps
            high = torch.rand(b, device=dev) < args.high_noise_fraction
            t = torch.where(high, torch.randint(args.high_noise_from, 1000, (b,), device=dev), t)
        noise = torch.randn_like(z0)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        w = min_snr_weights(acp[t], args.min_snr)
        losses = {}
        with autocast(dev):
            states = text(ids).last_hidden_state
            if "unet" in trained:
                losses["unet"] = server(zt, t, encoder_hidden_states=states).sample
            if device_unet is not None:
                losses["device_unet"] = device_unet(zt, t, encoder_hidden_states=states.detach()).sample
        for k, pred in losses.items():
            losses[k] = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
        total = sum((l * w).mean() for l in losses.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, m in trained.items():
            emas[k].update(m)
        if step % 50 == 0:
            for k, l in losses.items():  # the plain (unweighted) epsilon MSE
                v = l.mean().item()
                smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
        if step % 200 == 0 or step == plan.total - 1:
            for k in curves:
                curves[k].append([step, smooth[k]])
            print(f"step {step}/{plan.total} " + " ".join(f"{k} {v:.4f}" for k, v in smooth.items())
                  + f" lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f} s)", flush=True)
        step += 1
        if args.checkpoint_seconds and time.time() - last_save > args.checkpoint_seconds:
            save(emas, step, plan.total, curves, time.time() - t0, final=False)
            if args.keep_state:
                torch.save(state(), args.out / "train_state.pt")
            last_save = time.time()
    save(emas, step, plan.total, curves, time.time() - t0, final=True)
    if args.keep_state:
        torch.save(state(), args.out / "train_state.pt")


# --------------------------------------------------------------------------------------------
# main


def write_static(out: Path, tokenizer: Path):
    from diffusers import DDIMScheduler
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1, prediction_type="epsilon").save_pretrained(out / "scheduler")
    shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a `veil dataset` folder or a pack file")
    ap.add_argument("--pack-to", type=Path, help="pack --data into this one file and stop")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tar-to", type=Path,
                    help="also write the model folder as three tars into this folder at every save "
                         "(a cut-off run on a lent machine keeps what it saved)")
    ap.add_argument("--tokenizer", default=Path("models/tiny-random/tokenizer"), type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-from", type=Path, help="reuse this trained vae/ folder")
    ap.add_argument("--vae-steps", type=int, default=0)
    ap.add_argument("--vae-seconds", type=float, default=100)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-channels", default="32,64,64")
    ap.add_argument("--vae-layers", type=int, default=1)
    ap.add_argument("--object-weight", type=float, default=20.0,
                    help="VAE loss weight of object pixels relative to background pixels")
    ap.add_argument("--norm-groups", type=int, default=8, help="GroupNorm groups (VAE and U-Nets)")
    ap.add_argument("--text-width", type=int, default=96)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--text-heads", type=int, default=4)
    ap.add_argument("--unet-channels", default="48,96")
    ap.add_argument("--device-unet-channels", default="24,48", help="empty: no device U-Net")
    ap.add_argument("--layers", type=int, default=2, help="U-Net layers per block")
    ap.add_argument("--head-dim", type=int, default=24, help="attention head width in the U-Nets")
    ap.add_argument("--unet-steps", type=int, default=0)
    ap.add_argument("--unet-seconds", type=float, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--checkpoint-seconds", type=float, default=60,
                    help="save the EMA weights this often (0: only at the end)")
    ap.add_argument("--keep-state", action="store_true",
                    help="write OUT/train_state.pt at every checkpoint (for --resume)")
    ap.add_argument("--init-from", type=Path,
                    help="start the text encoder and U-Nets from this earlier output's weights "
                         "(with a fresh optimiser and schedule; use --vae-from DIR/vae with it)")
    ap.add_argument("--train", default="text,unet,device_unet",
                    type=lambda v: set(v.split(",")) if v else set(),
                    help="which of text, unet, device_unet learn (the others are kept as loaded; "
                         "with --init-from only)")
    ap.add_argument("--high-noise-fraction", type=float, default=0.0,
                    help="draw this fraction of each batch's timesteps from [--high-noise-from, "
                         "1000) instead of [0, 1000): where the layout (the position) is decided")
    ap.add_argument("--high-noise-from", type=int, default=500)
    ap.add_argument("--two-object-weight", type=float, default=1.0,
                    help="draw pictures whose caption names two objects this many times as often "
                         "(where the held-out split's position errors are: attribute binding)")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="bf16 autocast on the CPU too (as on CUDA); for CPUs with bf16 dot products")
    ap.add_argument("--latents-cache", type=Path,
                    help="the encoded dataset: read from this file if it exists, else written there "
                         "(a CPU run encodes 100k pictures once, not at every restart); it is keyed "
                         "by a hash of the pictures and the VAE's weights and encoded again when "
                         "either differs")
    ap.add_argument("--resume", type=Path, help="continue the U-Net stage from this train_state.pt")
    return ap.parse_args()


def main():
    global CPU_BF16
    args = parse_args()
    if args.train != {"text", "unet", "device_unet"} and not args.init_from:
        sys.exit("--train with fewer networks needs --init-from (the others are kept from there)")
    if not args.train & {"unet", "device_unet"} or not args.train <= {"text", "unet", "device_unet"}:
        sys.exit("--train names some of text, unet, device_unet, and at least one U-Net")
    if "text" in args.train and "unet" not in args.train:
        sys.exit("--train text needs unet: only the server U-Net's loss reaches the text encoder")
    CPU_BF16 = args.cpu_bf16
    if args.pack_to:
        return pack(args.data, args.pack_to)
    if not args.out:
        sys.exit("--out is required")
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    started = time.time()
    x_all, captions = load_data(args.data)
    x_all = x_all.to(dev)
    print(f"data: {x_all.shape[0]} pictures, {time.time() - started:.1f} s", flush=True)
    machine = (torch.cuda.get_device_name(0) if dev.type == "cuda"
               else f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    log = {"data": {"pictures": x_all.shape[0], "source": str(args.data)}, "stages": {},
           "device": machine, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
           "commands": ["python3 " + " ".join(sys.argv)]}
    out = args.out
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_static(out, args.tokenizer)

    def write_log():
        log["seconds"] = time.time() - started
        (out / "training_log.json").write_text(json.dumps(log, indent=1))
        if args.tar_to:  # unet.tar, device_unet.tar and rest.tar: each under 16 MiB
            args.tar_to.mkdir(parents=True, exist_ok=True)
            parts = {"unet": ["unet"], "device_unet": ["device_unet"],
                     "rest": [c.name for c in out.iterdir()
                              if c.name not in ("unet", "device_unet", "train_state.pt")]}
            for name, children in parts.items():
                tmp = args.tar_to / f"{name}.tar.tmp"
                with tarfile.open(tmp, "w") as t:
                    for c in children:
                        if (out / c).exists():
                            t.add(out / c, arcname=c)
                tmp.replace(args.tar_to / f"{name}.tar")

    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from).to(dev).eval()
        vae.save_pretrained(out / "vae")
        log["stages"]["vae"] = {"reused": str(args.vae_from)}
    else:
        vae = train_vae(args, x_all, dev, log, out)
    write_log()
    latents = None
    key = latents_key(x_all, vae) if args.latents_cache else None
    if args.latents_cache and args.latents_cache.is_file():
        cached = torch.load(args.latents_cache, map_location=dev)
        if isinstance(cached, dict) and cached.get("key") == key:
            latents = cached["latents"]
            print(f"latents: {tuple(latents.shape)} from {args.latents_cache}", flush=True)
        else:
            print(f"{args.latents_cache} was encoded from other pictures or another VAE: "
                  "encoding again", flush=True)
    if latents is None:
        latents = encode_all(vae, x_all, dev)
        if args.latents_cache:
            torch.save({"key": key, "latents": latents.cpu()}, args.latents_cache)
    del x_all, vae

    tok = CLIPTokenizer.from_pretrained(args.tokenizer)
    ids_all = tok(captions + [""], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
    empty_ids, ids_all = ids_all[-1:], ids_all[:-1]
    if args.init_from:  # continue from an earlier run's (EMA) weights with a fresh optimiser
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel
        nets = {"text": CLIPTextModel.from_pretrained(args.init_from / "text_encoder").to(dev),
                "unet": UNet2DConditionModel.from_pretrained(args.init_from / "unet").to(dev)}
        if (args.init_from / "device_unet" / "unet").is_dir():
            nets["device_unet"] = UNet2DConditionModel.from_pretrained(
                args.init_from / "device_unet" / "unet").to(dev)
        earlier = json.loads((args.init_from / "training_log.json").read_text())
        log["commands"] = earlier.get("commands", []) + log["commands"]
        log["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: earlier.get(k) for k in ("stages", "seconds", "device", "torch", "args")}]
    else:
        nets = {"text": text_encoder_of(tok, args, dev),
                "unet": unet_of(channels(args.unet_channels), args.layers, args.head_dim, args, dev)}
        if args.device_unet_channels:
            nets["device_unet"] = unet_of(channels(args.device_unet_channels), args.layers,
                                          args.head_dim, args, dev)
    folders = {"text": out / "text_encoder", "unet": out / "unet",
               "device_unet": out / "device_unet" / "unet"}

    def save(emas, step, total, curves, seconds, final):
        for k, m in nets.items():
            if k not in emas:  # not trained in this run: saved as loaded
                m.save_pretrained(folders[k])
                continue
            keep = [p.detach().clone() for p in m.parameters()]
            emas[k].copy_to(m)
            m.save_pretrained(folders[k])
            with torch.no_grad():
                for p, v in zip(m.parameters(), keep):
                    p.copy_(v)
        for k, c in curves.items():
            log["stages"][k] = {"steps": step, "planned_steps": total, "batch": args.batch,
                                "seconds": seconds, "curve": c, "final": final,
                                "parameters": sum(p.numel() for p in nets[k].parameters())}
        log["stages"]["text_encoder"] = {"parameters": sum(p.numel() for p in nets["text"].parameters())}
        write_log()
        print(f"saved at step {step} ({'final' if final else 'checkpoint'})", flush=True)

    pick = None
    if args.two_object_weight != 1.0:
        two = torch.tensor([" and " in c for c in captions], device=dev)
        pick = torch.where(two, args.two_object_weight, 1.0)
        share = two.float().mean().item()
        print(f"two-object captions: {share:.1%} of the data, drawn x{args.two_object_weight}",
              flush=True)
    train_unets(args, nets, latents, ids_all, empty_ids, dev, log, save, pick)
    print(f"saved {out} in {time.time() - started:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
