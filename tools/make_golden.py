#!/usr/bin/env python3
"""Build a tiny random-weight Stable Diffusion pipeline and golden reference outputs.

Writes
  models/tiny-random/                       diffusers layout (model_index.json, text_encoder/,
                                            tokenizer/, unet/, vae/, scheduler/), safetensors weights
  tests/fixtures/golden/golden.safetensors  reference tensors (float32; token ids int64)
  tests/fixtures/golden/golden.json         description of every tensor + parameters + versions

All goldens are computed with the pipeline *re-loaded from disk* so that they correspond exactly to
the saved weights.  Everything is float32 on CPU.  Deterministic: fixed seeds everywhere.

Usage: python3 tools/make_golden.py [--root <repo root>]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tokenizer  # noqa: E402

PROMPT_A = "a small red circle at the top left on a white background"
PROMPT_B = ""
UNET_TIMESTEP = 501
DDIM_STEPS = 3
DDIM_GUIDANCE = 5.0
IMAGE_SIZE = 64
UNET_CONV_OUT_GAIN = 2.0

SEEDS = {
    "text_encoder_init": 0,
    "vae_init": 1,
    "unet_init": 2,
    "perturb_text_encoder": 100,
    "perturb_vae": 101,
    "perturb_unet": 102,
    "unet_sample": 1000,
    "vae_latents": 1001,
    "vae_image": 1002,
    "ddim_latents_init": 1003,
}

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def text_encoder_config(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 32],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)

UNET_KW = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
    use_linear_projection=False,
)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> dict:
    """Make every parameter non-trivial and deterministic.

    * GroupNorm / LayerNorm weight -> 1 + 0.1*randn, bias -> 0.1*randn
    * every other bias            -> 0.1*randn
    * weights that are entirely zero after default init -> += 0.05*randn
    Other weights keep their (seeded) default init.
    """
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, m in model.named_modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for pname, _ in m.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    stats = {"norm": 0, "bias": 0, "zero_weight": 0}
    for name, p in model.named_parameters():  # deterministic (registration) order
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name in norm_params and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
            stats["norm"] += 1
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
            stats["bias"] += 1
        elif bool((p == 0).all()):
            p.add_(0.05 * noise)
            stats["zero_weight"] += 1
    return stats


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def add_text_model_prefix(path: str) -> bool:
    """transformers >= 5 saves CLIPTextModel keys without the `text_model.` prefix (and strips it
    when loading).  Rewrite the file in the layout of the published SD checkpoints / transformers < 5
    (`text_model.embeddings.token_embedding.weight`, ...).  Returns True if the file was rewritten."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if all(k.startswith("text_model.") for k in tensors):
        return False
    tensors = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in tensors.items()}
    meta.setdefault("format", "pt")
    safetensors.torch.save_file(tensors, path, metadata=meta)
    return True


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    args = ap.parse_args()

    import diffusers
    import safetensors
    import safetensors.torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = os.path.join(args.root, "models", "tiny-random")
    golden_dir = os.path.join(args.root, "tests", "fixtures", "golden")

    # ---------------------------------------------------------------- build
    tok_tmp = os.path.join(args.root, "models", ".tiny-tokenizer-tmp")
    tokenizer, vocab, merges = make_tokenizer.build_tokenizer(tok_tmp, verbose=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    torch.manual_seed(SEEDS["text_encoder_init"])
    text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), bos, eos)).eval()
    torch.manual_seed(SEEDS["vae_init"])
    vae = AutoencoderKL(**VAE_KW).eval()
    torch.manual_seed(SEEDS["unet_init"])
    unet = UNet2DConditionModel(**UNET_KW).eval()
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)

    perturb_stats = {
        "text_encoder": perturb(text_encoder, SEEDS["perturb_text_encoder"]),
        "vae": perturb(vae, SEEDS["perturb_vae"]),
        "unet": perturb(unet, SEEDS["perturb_unet"]),
    }
    # Default init gives a U-Net output std of ~0.3; double the final conv so it sits well inside
    # [0.3, 3] (a near-degenerate output would make the golden comparison weak).
    with torch.no_grad():
        unet.conv_out.weight.mul_(UNET_CONV_OUT_GAIN)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # Complete/normalise the tokenizer folder (vocab.json, merges.txt, special_tokens_map.json, ...).
    make_tokenizer.build_tokenizer(os.path.join(model_dir, "tokenizer"), verbose=False)
    shutil.rmtree(tok_tmp)
    te_prefixed = add_text_model_prefix(os.path.join(model_dir, "text_encoder", "model.safetensors"))
    ref_state = {
        "text_encoder": {k: v.clone() for k, v in text_encoder.state_dict().items()},
        "unet": {k: v.clone() for k, v in unet.state_dict().items()},
        "vae": {k: v.clone() for k, v in vae.state_dict().items()},
    }
    del pipe, vae, unet, text_encoder

    # ---------------------------------------------------------------- reload from disk
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    tokenizer, text_encoder, unet, vae, scheduler = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, pipe.scheduler
    assert isinstance(scheduler, DDIMScheduler), type(scheduler)
    for name, m in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        m.eval()
        assert next(m.parameters()).dtype == torch.float32
        sd = m.state_dict()
        assert sd.keys() == ref_state[name].keys(), name
        assert all(torch.equal(sd[k], ref_state[name][k]) for k in sd), f"{name}: reloaded weights differ"

    te_keys = list(safetensors.safe_open(os.path.join(model_dir, "text_encoder", "model.safetensors"), "pt").keys())
    vae_keys = list(safetensors.safe_open(os.path.join(model_dir, "vae", "diffusion_pytorch_model.safetensors"), "pt").keys())

    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}

    def put(name, t, what):
        t = t.detach().cpu().contiguous()
        if t.dtype not in (torch.int64,):
            t = t.to(torch.float32)
        out[name] = t
        desc[name] = what

    def ids_for(p):
        return tokenizer(p, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids

    with torch.inference_mode():
        # ------------------------------------------------------------ tokenizer + text encoder
        ids_a, ids_b = ids_for(PROMPT_A), ids_for(PROMPT_B)
        put("input_ids_a", ids_a, f"int64 [1,77]: tokenizer(prompt_a, padding='max_length', max_length=77, truncation=True).input_ids, prompt_a={PROMPT_A!r}")
        put("input_ids_b", ids_b, "int64 [1,77]: same for prompt_b='' (empty prompt; also what CFG uses as the unconditional prompt)")
        hid_a = text_encoder(ids_a)[0]
        hid_b = text_encoder(ids_b)[0]
        put("text_hidden_a", hid_a, "text_encoder(input_ids_a)[0] = last_hidden_state (after final_layer_norm), no attention mask, [1,77,32]")
        put("text_hidden_b", hid_b, "text_encoder(input_ids_b)[0], [1,77,32]")

        # ------------------------------------------------------------ U-Net
        sample = torch.randn(2, 4, 12, 10, generator=gen(SEEDS["unet_sample"]))
        context = torch.cat([hid_b, hid_a], dim=0)
        t = torch.tensor([UNET_TIMESTEP], dtype=torch.int64)
        unet_out = unet(sample, t, encoder_hidden_states=context).sample
        put("unet_sample", sample, f"torch.randn(2,4,12,10, generator=Generator().manual_seed({SEEDS['unet_sample']}))")
        put("unet_timestep", t.to(torch.float32), f"[1] float32 holding {UNET_TIMESTEP}; passed to the U-Net as int64 tensor([{UNET_TIMESTEP}]) (broadcast to the batch)")
        put("unet_context", context, "cat([text_hidden_b, text_hidden_a], dim=0) [2,77,32] (uncond first, as in CFG)")
        put("unet_out", unet_out, "unet(unet_sample, 501, encoder_hidden_states=unet_context).sample [2,4,12,10]")
        unet_std = float(unet_out.std())

        # ------------------------------------------------------------ VAE
        lat = torch.randn(1, 4, 8, 8, generator=gen(SEEDS["vae_latents"]))
        put("vae_latents", lat, f"torch.randn(1,4,8,8, generator=Generator().manual_seed({SEEDS['vae_latents']}))")
        put("vae_decoded", vae.decode(lat).sample, "vae.decode(vae_latents).sample [1,3,64,64]: raw, no 1/scaling_factor, no clamp/denormalise")
        img = torch.rand(1, 3, 64, 64, generator=gen(SEEDS["vae_image"])) * 2.0 - 1.0
        put("vae_image", img, f"torch.rand(1,3,64,64, generator=Generator().manual_seed({SEEDS['vae_image']}))*2-1 (uniform in [-1,1))")
        post = vae.encode(img).latent_dist
        put("vae_posterior_mean", post.mean, "vae.encode(vae_image).latent_dist.mean [1,4,8,8] (no scaling_factor applied)")
        put("vae_posterior_logvar", post.logvar, "vae.encode(vae_image).latent_dist.logvar [1,4,8,8] (clamped to [-30,20] by diffusers)")

        # ------------------------------------------------------------ DDIM + CFG pipeline run
        lat0 = torch.randn(1, 4, 8, 8, generator=gen(SEEDS["ddim_latents_init"]))
        put("ddim_latents_init", lat0, f"torch.randn(1,4,8,8, generator=Generator().manual_seed({SEEDS['ddim_latents_init']})); init_noise_sigma=1 for DDIM")
        steps: list[torch.Tensor] = []
        unet_calls: list[torch.Tensor] = []

        def cb(p, i, tstep, kw):
            steps.append(kw["latents"].clone())
            return kw

        hook = unet.register_forward_hook(lambda m, a, o: unet_calls.append((o[0] if isinstance(o, tuple) else o.sample).clone()))
        common = dict(
            prompt=PROMPT_A,
            num_inference_steps=DDIM_STEPS,
            guidance_scale=DDIM_GUIDANCE,
            latents=lat0.clone(),
            eta=0.0,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
        )
        lat_final = pipe(**common, output_type="latent", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images
        hook.remove()
        timesteps = [int(x) for x in pipe.scheduler.timesteps]
        assert len(steps) == DDIM_STEPS and len(unet_calls) == DDIM_STEPS
        assert torch.equal(steps[-1], lat_final)
        for i, s in enumerate(steps):
            put(f"ddim_latents_step{i + 1}", s, f"latents after DDIM step {i + 1} (t={timesteps[i]}), from callback_on_step_end [1,4,8,8]")
        for i, u in enumerate(unet_calls):
            eps_u, eps_c = u.chunk(2)
            put(f"ddim_unet_out_step{i + 1}", u, f"raw U-Net output at step {i + 1} (t={timesteps[i]}) on the CFG batch [uncond, cond] [2,4,8,8]")
            put(f"ddim_eps_step{i + 1}", eps_u + DDIM_GUIDANCE * (eps_c - eps_u), f"guided noise prediction at step {i + 1}: uncond + {DDIM_GUIDANCE}*(cond-uncond) [1,4,8,8]")
        put("ddim_timesteps", torch.tensor(timesteps, dtype=torch.float32), "the DDIM timesteps used (float32 holding integers)")
        image_pt = pipe(**common, output_type="pt").images
        manual = (vae.decode(lat_final / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        max_diff_manual = float((manual - image_pt).abs().max())
        put("ddim_image", image_pt, "pipe(..., output_type='pt').images [1,3,64,64] in [0,1] = (vae.decode(latents/0.18215).sample/2+0.5).clamp(0,1)")
        put("ddim_alphas_cumprod", scheduler.alphas_cumprod.clone(), "scheduler.alphas_cumprod [1000] (scaled_linear betas 0.00085..0.012)")

        # ------------------------------------------------------------ tokenizer cases
        cases = []
        for p in make_tokenizer.tokenizer_case_prompts():
            enc = tokenizer(p, padding="max_length", max_length=77, truncation=True)
            untrunc = tokenizer(p).input_ids
            cases.append(
                {
                    "prompt": p,
                    "input_ids": enc.input_ids,
                    "tokens": tokenizer.convert_ids_to_tokens(untrunc),
                    "untruncated_len": len(untrunc),
                }
            )

    # ---------------------------------------------------------------- write
    os.makedirs(golden_dir, exist_ok=True)
    st_path = os.path.join(golden_dir, "golden.safetensors")
    safetensors.torch.save_file(out, st_path, metadata={"generator": "tools/make_golden.py"})

    te_cfg = text_encoder.config
    info = {
        "generator": "tools/make_golden.py",
        "model_dir": "models/tiny-random",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "device": "cpu",
        "dtype": "float32 for every tensor except input_ids_* (int64)",
        "params": {
            "prompt_a": PROMPT_A,
            "prompt_b": PROMPT_B,
            "unet_timestep": UNET_TIMESTEP,
            "ddim_num_inference_steps": DDIM_STEPS,
            "ddim_guidance_scale": DDIM_GUIDANCE,
            "ddim_eta": 0.0,
            "ddim_negative_prompt": None,
            "ddim_note": "negative_prompt=None -> diffusers uses '' as the unconditional prompt; CFG batch is [uncond, cond]",
            "ddim_timesteps": timesteps,
            "height": IMAGE_SIZE,
            "width": IMAGE_SIZE,
            "seeds": SEEDS,
            "seed_note": "inputs are drawn with torch.Generator(cpu).manual_seed(seed); models built after torch.manual_seed(seed)",
            "weight_perturbation": "norm weights 1+0.1*randn, biases 0.1*randn, all-zero weights +0.05*randn; see perturb(); then unet.conv_out.weight *= UNET_CONV_OUT_GAIN",
            "unet_conv_out_gain": UNET_CONV_OUT_GAIN,
            "perturb_counts": perturb_stats,
            "scheduler_config": SCHEDULER_CONFIG,
            "vae_scaling_factor": vae.config.scaling_factor,
            "tokenizer": {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, "num_merges": len(merges), "model_max_length": tokenizer.model_max_length},
            "text_encoder": {k: getattr(te_cfg, k) for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"]},
        },
        "checks": {
            "unet_out_std": unet_std,
            "ddim_image_manual_vs_pipeline_max_abs_diff": max_diff_manual,
            "text_encoder_saved_keys_include_position_ids": any("position_ids" in k for k in te_keys),
            "text_encoder_keys_prefixed_with_text_model_by_this_script": te_prefixed,
            "text_encoder_first_keys": te_keys[:3],
            "vae_attention_key_style": sorted({k.split(".")[-2] for k in vae_keys if ".attentions." in k}),
        },
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "description": desc[name], "mean": float(t.double().mean()), "std": float(t.double().std()) if t.numel() > 1 else 0.0}
            for name, t in out.items()
        },
        "tokenizer_cases_note": "input_ids = tokenizer(prompt, padding='max_length', max_length=77, truncation=True).input_ids (what the SD pipeline feeds the text encoder); tokens = untruncated token strings incl. BOS/EOS",
        "tokenizer_cases": cases,
    }
    with open(os.path.join(golden_dir, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # safetensors creates files 0600; make everything we wrote world-readable like the rest.
    for d, _, fs in os.walk(model_dir):
        for f in fs:
            os.chmod(os.path.join(d, f), 0o644)
    gfiles = [st_path, os.path.join(golden_dir, "golden.json")]
    for f in gfiles:
        os.chmod(f, 0o644)
    msize, gsize = folder_size(model_dir), sum(os.path.getsize(f) for f in gfiles)
    print(f"unet_out std = {unet_std:.4f}  (mean {float(unet_out.mean()):.4f})")
    print(f"ddim timesteps = {timesteps}; image manual-vs-pipeline max diff = {max_diff_manual:.2e}")
    print(f"text encoder keys include position_ids: {info['checks']['text_encoder_saved_keys_include_position_ids']}")
    print(f"vae attention keys: {info['checks']['vae_attention_key_style']}")
    for name, t in out.items():
        print(f"  {name:28s} {str(list(t.shape)):18s} {str(t.dtype):14s} std={info['tensors'][name]['std']:.4f}")
    print(f"model folder {msize / 1e6:.2f} MB, golden files {gsize / 1e6:.2f} MB, total {(msize + gsize) / 1e6:.2f} MB")
    if not 0.3 <= unet_std <= 3.0:
        print("WARNING: unet_out std outside [0.3, 3]", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
