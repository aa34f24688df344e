#!/usr/bin/env python3
"""Trains Veil's tiny text-to-image model on the procedural shapes dataset (`veil dataset`).

Produces a diffusers-layout folder that both diffusers and Veil's Rust loader read unchanged:
  vae/           AutoencoderKL, 64x64 RGB <-> 4x16x16 latents (scaling_factor measured)
  text_encoder/  CLIPTextModel, trained jointly with the server U-Net
  tokenizer/     the CLIP BPE tokenizer of models/tiny-random (copied)
  unet/          the "server" UNet2DConditionModel (2 levels: 16 -> 8 rows, so strict runs N <= 8)
  device_unet/unet/  a smaller "device" U-Net on the same latents and text states (the
                 obfuscated policy's on-phone model; `--device-model models/tiny-shapes/device_unet`)
  scheduler/     DDIM, SD's betas
and training logs (loss curves) as JSON.

  veil dataset --out data --count 30000 --seed 1 --side 64
  python3 tools/train_tiny.py --data data --out models/tiny-shapes --device cuda

Stages: VAE (reconstruction + small KL), then the server U-Net with the text encoder
(epsilon prediction, 10% empty captions for classifier-free guidance), then the device U-Net
with the text encoder frozen.

Status (2026-11-22): no GPU is lent to this project's sessions, so it runs on 2 CPU cores:
about 0.9 s per VAE step and 1.0-1.1 s per server U-Net step at batch 32 with the sizes below
(bf16 autocast on this CPU is 10x slower; f32 it is).

  python3 tools/train_tiny.py --data .train/data --out .train/out --device cpu --batch 32 \
      --vae-channels 16,32,32 --unet-channels 32,64 --lr 1e-3 --vae-steps 1100 \
      --unet-steps 2400 --device-unet-steps 0

A first CPU run (900 VAE steps, then 1,700 of 2,400 U-Net steps; 85 min of wall time, much
of it shared with Rust builds) learned the backgrounds, but its VAE (unweighted loss, 24.1 dB
PSNR, mostly background) decoded every object as a colourless blob, so the U-Net could not learn colours; the VAE loss now weighs object
pixels (--object-weight) and reports PSNR on object pixels. Long runs continue in pieces:
--vae-from reuses a trained VAE, --unet-from continues the text encoder and U-Net of an earlier
output, and the U-Net is saved every --checkpoint-every steps.
"""
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def load_data(folder: Path):
    rows = [json.loads(l) for l in (folder / "captions.jsonl").read_text().splitlines() if l.strip()]
    images = np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [r["caption"] for r in rows]


def channels(text):
    return tuple(int(c) for c in text.split(","))


def lr_at(step, total, peak, warmup=200):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr


def train_vae(args, x_all, dev, log, out):
    """Trains the AutoencoderKL, saves it under out/vae, returns (latent means, scaling)."""
    from diffusers import AutoencoderKL
    n = x_all.shape[0]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=channels(args.vae_channels), layers_per_block=1, latent_channels=4,
        norm_num_groups=16, sample_size=64,
    ).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    curve = []
    t0 = time.time()
    for step in range(args.vae_steps):
        set_lr(opt, lr_at(step, args.vae_steps, 1e-3))
        idx = torch.randint(0, n, (args.batch,), device=dev)
        x = x_all[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample
        # Object pixels (those unlike the picture's corner, i.e. its background) weigh more.
        bg = x[:, :, :1, :1]
        obj = ((x - bg).abs().sum(1, keepdim=True) > 0.1).float()
        wmap = 1.0 + args.object_weight * obj
        err = (rec.float() - x) ** 2 + 0.5 * (rec.float() - x).abs()
        rec_loss = (err * wmap).sum() / (wmap.sum() * 3)
        kl = post.kl().mean() / (3 * 64 * 64)
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == args.vae_steps - 1:
            curve.append([step, rec_loss.item(), kl.item()])
            print(f"vae {step} rec {rec_loss.item():.4f} kl {kl.item():.3f}", flush=True)
    vae.eval()
    with torch.no_grad():
        zs = torch.cat([vae.encode(x_all[i:i + 512]).latent_dist.mean for i in range(0, n, 512)])
        scaling = float(1.0 / zs.std())
        rec = vae.decode(zs[:512]).sample
        psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x_all[:512])))
        x = x_all[:512]
        obj = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).expand_as(x)
        psnr_obj = float(10 * torch.log10(4.0 / ((rec - x)[obj] ** 2).mean()))
    vae.register_to_config(scaling_factor=scaling)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae")
    log["stages"]["vae"] = {"steps": args.vae_steps, "seconds": time.time() - t0, "curve": curve,
                            "scaling_factor": scaling, "reconstruction_psnr_db": psnr,
                            "object_psnr_db": psnr_obj, "object_weight": args.object_weight}
    print(f"vae done: scaling {scaling:.4f}, reconstruction PSNR {psnr:.1f} dB, "
          f"on object pixels {psnr_obj:.1f} dB", flush=True)
    return zs, scaling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer", default=Path("models/tiny-random/tokenizer"), type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--unet-steps", type=int, default=8000)
    ap.add_argument("--device-unet-steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vae-channels", default="32,64,64", help="AutoencoderKL block_out_channels")
    ap.add_argument("--unet-channels", default="64,128", help="server U-Net block_out_channels")
    ap.add_argument("--device-unet-channels", default="32,64", help="device U-Net block_out_channels")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak U-Net learning rate")
    ap.add_argument("--object-weight", type=float, default=20.0,
                    help="VAE loss weight of object pixels relative to background pixels (objects "
                         "are a few percent of a picture; unweighted, the VAE learns backgrounds "
                         "and blurs objects to colourless blobs)")
    ap.add_argument("--vae-from", type=Path,
                    help="reuse this trained vae/ folder instead of training one")
    ap.add_argument("--stop-after-vae", action="store_true", help="train and save the VAE only")
    ap.add_argument("--unet-from", type=Path,
                    help="continue training text_encoder/ and unet/ of this earlier output (with "
                         "--vae-from its vae/): a fresh optimiser and learning-rate schedule")
    ap.add_argument("--checkpoint-every", type=int, default=500,
                    help="save the U-Net being trained every N steps (a cut-off run keeps a usable model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    started = time.time()
    x_all, captions = load_data(args.data)
    x_all = x_all.to(dev)
    n = x_all.shape[0]
    print(f"data: {n} pictures {tuple(x_all.shape[1:])}, {time.time() - started:.1f} s", flush=True)
    log = {"data": {"pictures": n, "folder": str(args.data)}, "stages": {}}

    # --- VAE ---------------------------------------------------------------------------------
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from).to(dev)
        vae.eval()
        with torch.no_grad():
            zs = torch.cat([vae.encode(x_all[i:i + 512]).latent_dist.mean for i in range(0, n, 512)])
        scaling = vae.config.scaling_factor
        vae.save_pretrained(out / "vae")
        log["stages"]["vae"] = {"reused": str(args.vae_from)}
    else:
        zs, scaling = train_vae(args, x_all, dev, log, out)
    if args.stop_after_vae:
        print("stopping after the VAE (--stop-after-vae)", flush=True)
        return
    latents = (zs * scaling).detach()
    del zs

    # --- text encoder + tokenizer ------------------------------------------------------------
    tok = CLIPTokenizer.from_pretrained(args.tokenizer)
    ids_all = tok(captions + [""], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
    empty_ids = ids_all[-1:]
    ids_all = ids_all[:-1]
    text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256,
                              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, projection_dim=64, hidden_act="quick_gelu")
    text = (CLIPTextModel.from_pretrained(args.unet_from / "text_encoder") if args.unet_from
            else CLIPTextModel(text_cfg)).to(dev)

    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon")
    acp = train_sched.alphas_cumprod.to(dev)

    def unet_of(widths, layers, heads):
        return UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=layers,
            block_out_channels=widths,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=heads, norm_num_groups=min(32, widths[0]),
        ).to(dev)

    def train_unet(name, unet, steps, train_text, save):
        params = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
        text.train(train_text)
        text.requires_grad_(train_text)
        curve, ema = [], None
        t0 = time.time()
        for step in range(steps):
            set_lr(opt, lr_at(step, steps, args.lr))
            idx = torch.randint(0, n, (args.batch,), device=dev)
            z0 = latents[idx]
            ids = ids_all[idx]
            drop = torch.rand(args.batch, device=dev) < 0.1
            ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
            t = torch.randint(0, 1000, (args.batch,), device=dev)
            noise = torch.randn_like(z0)
            a = acp[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                states = text(ids).last_hidden_state
                pred = unet(zt, t, encoder_hidden_states=states).sample
            loss = F.mse_loss(pred.float(), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 200 == 0 or step == steps - 1:
                curve.append([step, ema])
                print(f"{name} {step} loss {ema:.4f} ({time.time() - t0:.0f} s)", flush=True)
            if args.checkpoint_every and step > 0 and step % args.checkpoint_every == 0:
                save()
                unet.train()
                text.train(train_text)
        unet.eval()
        text.eval()
        params_count = sum(p.numel() for p in unet.parameters())
        log["stages"][name] = {"steps": steps, "seconds": time.time() - t0, "curve": curve,
                               "parameters": params_count}

    def write_log():
        log["seconds"] = time.time() - started
        log["device"] = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        (out / "training_log.json").write_text(json.dumps(log, indent=1))

    # Each stage is saved when it ends, so a cut-off run keeps what it finished.
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1, prediction_type="epsilon").save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    server = (UNet2DConditionModel.from_pretrained(args.unet_from / "unet").to(dev) if args.unet_from
              else unet_of(channels(args.unet_channels), 1, 8))

    def save_server():
        text.save_pretrained(out / "text_encoder")
        tok.save_pretrained(out / "tokenizer")
        server.save_pretrained(out / "unet")
        write_log()

    train_unet("unet", server, args.unet_steps, train_text=True, save=save_server)
    save_server()
    write_log()
    if args.device_unet_steps > 0:
        device_unet = unet_of(channels(args.device_unet_channels), 1, 8)

        def save_device():
            device_unet.save_pretrained(out / "device_unet" / "unet")
            write_log()

        train_unet("device_unet", device_unet, args.device_unet_steps, train_text=False,
                   save=save_device)
        save_device()
    print(f"saved {out} in {log['seconds']:.0f} s total", flush=True)


if __name__ == "__main__":
    main()
