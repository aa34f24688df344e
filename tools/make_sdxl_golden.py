#!/usr/bin/env python3
"""Build a tiny random-weight Stable Diffusion XL pipeline and golden reference outputs.

Writes
  tests/fixtures/sdxl/model/               diffusers layout of a StableDiffusionXLPipeline
                                           (model_index.json with force_zeros_for_empty_prompt true,
                                           text_encoder/ CLIPTextModel, text_encoder_2/
                                           CLIPTextModelWithProjection, tokenizer/, tokenizer_2/, unet/,
                                           vae/, scheduler/ = SDXL base 1.0's published
                                           EulerDiscreteScheduler config), safetensors weights
  tests/fixtures/sdxl/golden.safetensors   reference tensors (float32; token ids int64)
  tests/fixtures/sdxl/golden.json          description of every tensor + parameters + versions

The configuration is deliberately unusual, to catch bugs a symmetric one would hide: two text
encoders of different widths (32 + 48 = cross_attention_dim 80) and activations (quick_gelu, gelu),
a pooled projection to 40, tokenizer_2 padding with "!" (as SDXL's does) instead of <|endoftext|>,
U-Net levels of different widths with head counts [2, 4, 4] (legacy `attention_head_dim`),
transformer depths [1, 1, 2] (the mid block takes the last), `text_time` added conditioning
(6 x 8 Fourier features + 40), a 3-level VAE (downsample factor 4) with SDXL's scaling factor
0.13025, and a non-square 48 x 64 image (latents 12 x 16; U-Net levels 12x16, 6x8, 3x4).

The U-Net widths are [8, 16, 24] rather than [32, 48, 64]: the latter makes a 2.6M-parameter
U-Net (10.6 MB) and the fixture must stay under 3 MB; every other structural choice is kept.

Goldens (all computed with the pipeline *re-loaded from disk*; float32 on CPU; fixed seeds):
  * text: both tokenizers' input_ids and `pipe.encode_prompt` (prompt_embeds = concat of both
    encoders' hidden_states[-2], pooled = text_encoder_2's projected pooled output; the negative
    embeddings are zeros because of force_zeros_for_empty_prompt) for two prompts
  * add_time_ids for original (48, 64), crop (0, 0), target (48, 64)
  * one U-Net call with CFG-style batch 2 and added conditioning
  * whole pipelines from given initial latents, guidance 5: Euler 3 steps and DDIM 3 steps
    (per-step latents, final latents, decoded image), and guidance 0 (no CFG) Euler 2 steps

Usage: /work/venv/bin/python tools/make_sdxl_golden.py [--root <repo root>]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dump_names_shapes  # noqa: E402
import make_golden  # noqa: E402
import make_tokenizer  # noqa: E402

PROMPT_A = "a small red circle at the top left on a white background"
PROMPT_B = "a blue square"
HEIGHT, WIDTH = 48, 64
UNET_TIMESTEP = 501
GUIDANCE = 5.0
STEPS = 3
NOCFG_STEPS = 2
UNET_CONV_OUT_GAIN = 2.0
MAX_FIXTURE_BYTES = 3_000_000
# SDXL's tokenizer_2 pads with "!" (id 0 in CLIP's byte-level vocab, and in ours).
PAD_2 = "!"

SEEDS = {
    "text_encoder_init": 10,
    "text_encoder_2_init": 11,
    "vae_init": 12,
    "unet_init": 13,
    "perturb_text_encoder": 110,
    "perturb_text_encoder_2": 111,
    "perturb_vae": 112,
    "perturb_unet": 113,
    "unet_sample": 2000,
    "latents_init": 2001,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json (EulerDiscreteScheduler).
SCHEDULER_CONFIG = dump_names_shapes.SDXL["scheduler"]


def text_encoder_config(vocab_size: int, bos: int, eos: int, pad: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        **kw,
    )


TEXT_ENCODER_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32)
TEXT_ENCODER_2_KW = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu", projection_dim=40)

VAE_KW = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 16],
    layers_per_block=1,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,
    force_upcast=True,
)

UNET_KW = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[8, 16, 24],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 4],  # legacy name: head counts (head dims 4 and 6 on the attention levels)
    cross_attention_dim=80,  # 32 (text_encoder) + 48 (text_encoder_2)
    use_linear_projection=True,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=88,  # 40 (pooled) + 6 * 8 (time ids)
)


def set_pad_token(folder: str, pad: str):
    """Turn a make_tokenizer.py folder into SDXL's tokenizer_2 layout: same vocab, `pad_token` "!"
    in special_tokens_map.json and tokenizer_config.json (and in tokenizer.json's padding, if any)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        cfg = json.load(open(path, encoding="utf-8"))
        cfg["pad_token"] = pad
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=name == "tokenizer_config.json")
            f.write("\n")
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tj):
        cfg = json.load(open(tj, encoding="utf-8"))
        if cfg.get("padding"):
            raise SystemExit(f"{tj} carries a padding config; expected null: {cfg['padding']}")


def build_tokenizers(tok_dir: str, tok2_dir: str):
    """tokenizer/ as make_golden.py builds it (pads with <|endoftext|>); tokenizer_2/ the same vocab
    padding with "!".  Returns (tokenizer, tokenizer_2, vocab, merges)."""
    from transformers import CLIPTokenizer

    tokenizer, vocab, merges = make_tokenizer.build_tokenizer(tok_dir, verbose=False)
    make_tokenizer.build_tokenizer(tok2_dir, verbose=False)
    set_pad_token(tok2_dir, PAD_2)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok2_dir)
    assert PAD_2 in vocab and tokenizer_2.pad_token == PAD_2 and tokenizer_2.pad_token_id == vocab[PAD_2], (tokenizer_2.pad_token, tokenizer_2.pad_token_id)
    assert tokenizer.pad_token_id == vocab[make_tokenizer.EOS]
    return tokenizer, tokenizer_2, vocab, merges


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    args = ap.parse_args()

    import diffusers
    import safetensors
    import safetensors.torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.set_num_threads(min(2, torch.get_num_threads()))
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    fixture_dir = os.path.join(args.root, "tests", "fixtures", "sdxl")
    model_dir = os.path.join(fixture_dir, "model")

    # ---------------------------------------------------------------- build
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, tokenizer_2, vocab, merges = build_tokenizers(os.path.join(tmp, "tokenizer"), os.path.join(tmp, "tokenizer_2"))
    bos, eos, pad2 = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer_2.pad_token_id

    torch.manual_seed(SEEDS["text_encoder_init"])
    text_encoder = CLIPTextModel(text_encoder_config(len(vocab), bos, eos, eos, **TEXT_ENCODER_KW)).eval()
    torch.manual_seed(SEEDS["text_encoder_2_init"])
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(len(vocab), bos, eos, pad2, **TEXT_ENCODER_2_KW)).eval()
    torch.manual_seed(SEEDS["vae_init"])
    vae = AutoencoderKL(**VAE_KW).eval()
    torch.manual_seed(SEEDS["unet_init"])
    unet = UNet2DConditionModel(**UNET_KW).eval()
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)

    perturb_stats = {
        "text_encoder": make_golden.perturb(text_encoder, SEEDS["perturb_text_encoder"]),
        "text_encoder_2": make_golden.perturb(text_encoder_2, SEEDS["perturb_text_encoder_2"]),
        "vae": make_golden.perturb(vae, SEEDS["perturb_vae"]),
        "unet": make_golden.perturb(unet, SEEDS["perturb_unet"]),
    }
    with torch.no_grad():
        unet.conv_out.weight.mul_(UNET_CONV_OUT_GAIN)

    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    if os.path.exists(fixture_dir):
        shutil.rmtree(fixture_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    # Complete/normalise the tokenizer folders; the scheduler config exactly as published.
    build_tokenizers(os.path.join(model_dir, "tokenizer"), os.path.join(model_dir, "tokenizer_2"))
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(SCHEDULER_CONFIG, f, indent=2)
        f.write("\n")
    te_prefixed = make_golden.add_text_model_prefix(os.path.join(model_dir, "text_encoder", "model.safetensors"))
    ref_state = {
        "text_encoder": {k: v.clone() for k, v in text_encoder.state_dict().items()},
        "text_encoder_2": {k: v.clone() for k, v in text_encoder_2.state_dict().items()},
        "unet": {k: v.clone() for k, v in unet.state_dict().items()},
        "vae": {k: v.clone() for k, v in vae.state_dict().items()},
    }
    del pipe, vae, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2

    # ---------------------------------------------------------------- reload from disk
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.watermark is None
    assert pipe.config.force_zeros_for_empty_prompt is True
    tokenizer, tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
    text_encoder, text_encoder_2, unet, vae = pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae
    euler = pipe.scheduler
    assert isinstance(euler, EulerDiscreteScheduler), type(euler)
    for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset", "timestep_spacing", "interpolation_type", "use_karras_sigmas", "prediction_type"):
        assert euler.config[k] == SCHEDULER_CONFIG[k], k
    assert tokenizer.pad_token_id == eos and tokenizer_2.pad_token_id == vocab[PAD_2] != eos
    for name, m in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet), ("vae", vae)):
        m.eval()
        assert next(m.parameters()).dtype == torch.float32
        sd = m.state_dict()
        assert sd.keys() == ref_state[name].keys(), name
        assert all(torch.equal(sd[k], ref_state[name][k]) for k in sd), f"{name}: reloaded weights differ"

    def keys_of(*parts):
        return list(safetensors.safe_open(os.path.join(model_dir, *parts), "pt").keys())

    te_keys = keys_of("text_encoder", "model.safetensors")
    te2_keys = keys_of("text_encoder_2", "model.safetensors")
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in te2_keys), te2_keys[:3]
    assert "text_projection.weight" in te2_keys and "text_projection.bias" not in te2_keys

    out: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}

    def put(name, t, what):
        t = t.detach().cpu().clone().contiguous()
        if t.dtype != torch.int64:
            t = t.to(torch.float32)
        assert name not in out, name
        out[name] = t
        desc[name] = what

    def ids(tok, p):
        return tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    checks: dict = {}
    with torch.inference_mode():
        # ------------------------------------------------------------ tokenizers + text encoders
        embeds = {}
        for tag, prompt in (("a", PROMPT_A), ("b", PROMPT_B)):
            ids1, ids2 = ids(tokenizer, prompt), ids(tokenizer_2, prompt)
            n_real = int((ids1 != eos).sum()) + 1  # BOS + tokens + first EOS
            assert torch.equal(ids1[:, :n_real], ids2[:, :n_real]), "tokenizers must agree before the padding"
            assert bool((ids1[:, n_real:] == eos).all()) and bool((ids2[:, n_real:] == pad2).all()), "padding"
            put(f"prompt_{tag}_input_ids", ids1, f"int64 [1,77]: tokenizer(prompt_{tag}, padding='max_length', max_length=77, truncation=True).input_ids (pads with <|endoftext|> = {eos}); prompt_{tag}={prompt!r}")
            put(f"prompt_{tag}_input_ids_2", ids2, f"int64 [1,77]: tokenizer_2(prompt_{tag}, ...).input_ids: the same ids up to and including the first <|endoftext|>, then padded with '!' = {pad2}")
            pe, npe, ppe, nppe = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=None)
            assert list(pe.shape) == [1, 77, 80] and list(ppe.shape) == [1, 40]
            put(f"prompt_{tag}_prompt_embeds", pe, "pipe.encode_prompt(...)[0] [1,77,80] = cat(text_encoder(input_ids, output_hidden_states=True).hidden_states[-2] [..,32], text_encoder_2(input_ids_2, ...).hidden_states[-2] [..,48], dim=-1): penultimate layer outputs, no final_layer_norm, no attention mask")
            put(f"prompt_{tag}_pooled_prompt_embeds", ppe, "pipe.encode_prompt(...)[2] [1,40] = text_encoder_2(input_ids_2).text_embeds = text_projection(final_layer_norm(last layer)[first <|endoftext|> position]) (no bias)")
            # Independent re-computation, to pin down exactly what encode_prompt does.
            o1 = text_encoder(ids1, output_hidden_states=True)
            o2 = text_encoder_2(ids2, output_hidden_states=True)
            assert len(o1.hidden_states) == TEXT_ENCODER_KW["num_hidden_layers"] + 1 and len(o2.hidden_states) == TEXT_ENCODER_2_KW["num_hidden_layers"] + 1
            manual = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            eos_pos = int((ids2[0] == eos).int().argmax())
            pooled_manual = text_encoder_2.text_projection(o2.last_hidden_state[:, eos_pos])
            checks[f"prompt_{tag}_embeds_vs_manual_max_abs_diff"] = float((manual - pe).abs().max())
            checks[f"prompt_{tag}_pooled_vs_manual_max_abs_diff"] = float((pooled_manual - ppe).abs().max())
            checks[f"prompt_{tag}_eos_position"] = eos_pos
            put(f"prompt_{tag}_text_encoder_2_last_hidden", o2.last_hidden_state, "text_encoder_2(input_ids_2).last_hidden_state [1,77,48] (after final_layer_norm; the pooled output takes row eos_position of it) - for debugging")
            embeds[tag] = (pe, npe, ppe, nppe)
        _, npe, _, nppe = embeds["a"]
        assert not bool(npe.any()) and not bool(nppe.any()), "force_zeros_for_empty_prompt: negative embeddings must be zeros"
        put("negative_prompt_embeds", npe, "pipe.encode_prompt(prompt_a, negative_prompt=None, do_classifier_free_guidance=True)[1] [1,77,80]: all zeros (force_zeros_for_empty_prompt; no text encoder call)")
        put("negative_pooled_prompt_embeds", nppe, "pipe.encode_prompt(...)[3] [1,40]: all zeros (force_zeros_for_empty_prompt)")

        # ------------------------------------------------------------ add_time_ids
        time_ids = pipe._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), dtype=torch.float32, text_encoder_projection_dim=text_encoder_2.config.projection_dim)
        assert time_ids.tolist() == [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]], time_ids
        put("add_time_ids", time_ids, f"pipe._get_add_time_ids(original_size=({HEIGHT},{WIDTH}), crops_coords_top_left=(0,0), target_size=({HEIGHT},{WIDTH})) [1,6] = [[{HEIGHT},{WIDTH},0,0,{HEIGHT},{WIDTH}]] float32 (height first)")

        # ------------------------------------------------------------ U-Net
        pe_a, npe_a, ppe_a, nppe_a = embeds["a"]
        sample = torch.randn(2, 4, HEIGHT // 4, WIDTH // 4, generator=make_golden.gen(SEEDS["unet_sample"]))
        ehs = torch.cat([npe_a, pe_a], dim=0)
        text_embeds = torch.cat([nppe_a, ppe_a], dim=0)
        tids = time_ids.repeat(2, 1)
        t = torch.tensor([UNET_TIMESTEP], dtype=torch.int64)
        unet_out = unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": tids}).sample
        put("unet_sample", sample, f"torch.randn(2,4,12,16, generator=Generator().manual_seed({SEEDS['unet_sample']}))")
        put("unet_timestep", t.to(torch.float32), f"[1] float32 holding {UNET_TIMESTEP}; passed to the U-Net as int64 tensor([{UNET_TIMESTEP}]) (broadcast to the batch)")
        put("unet_encoder_hidden_states", ehs, "cat([negative_prompt_embeds, prompt_a_prompt_embeds], dim=0) [2,77,80] (uncond first, as in CFG)")
        put("unet_text_embeds", text_embeds, "added_cond_kwargs['text_embeds'] = cat([negative_pooled_prompt_embeds, prompt_a_pooled_prompt_embeds], dim=0) [2,40]")
        put("unet_time_ids", tids, "added_cond_kwargs['time_ids'] = add_time_ids.repeat(2,1) [2,6]")
        put("unet_out", unet_out, f"unet(unet_sample, {UNET_TIMESTEP}, encoder_hidden_states=unet_encoder_hidden_states, added_cond_kwargs={{text_embeds, time_ids}}).sample [2,4,12,16]")
        unet_std = float(unet_out.std())

        # ------------------------------------------------------------ pipelines
        lat0 = torch.randn(1, 4, HEIGHT // 4, WIDTH // 4, generator=make_golden.gen(SEEDS["latents_init"]))
        put("latents_init", lat0, f"torch.randn(1,4,12,16, generator=Generator().manual_seed({SEEDS['latents_init']})), passed as latents= (the pipeline multiplies by scheduler.init_noise_sigma)")

        def run(tag, sched, steps, guidance, n_expected_steps, store_steps=True):
            pipe.scheduler = sched
            per_step: list[torch.Tensor] = []
            unet_calls: list[dict] = []

            def cb(p, i, tstep, kw):
                per_step.append(kw["latents"].clone())
                return kw

            def pre(m, a, kw):
                unet_calls.append({"sample": a[0].clone(), **{k: v.clone() for k, v in kw["added_cond_kwargs"].items()}, "encoder_hidden_states": kw["encoder_hidden_states"].clone()})

            h1 = unet.register_forward_pre_hook(pre, with_kwargs=True)
            outs: list[torch.Tensor] = []
            h2 = unet.register_forward_hook(lambda m, a, o: outs.append((o[0] if isinstance(o, tuple) else o.sample).clone()))
            try:
                image = pipe(
                    prompt=PROMPT_A,
                    height=HEIGHT,
                    width=WIDTH,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    latents=lat0.clone(),
                    output_type="np",
                    callback_on_step_end=cb,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images
            finally:
                h1.remove()
                h2.remove()
            timesteps = [float(x) for x in pipe.scheduler.timesteps]
            assert len(per_step) == n_expected_steps == len(unet_calls) == len(outs)
            batch = 2 if guidance > 1 else 1
            for call in unet_calls:
                assert call["sample"].shape[0] == batch
                assert torch.equal(call["time_ids"], time_ids.repeat(batch, 1)), call["time_ids"]
                if batch == 2:
                    assert torch.equal(call["encoder_hidden_states"], ehs) and torch.equal(call["text_embeds"], text_embeds)
                else:
                    assert torch.equal(call["encoder_hidden_states"], pe_a) and torch.equal(call["text_embeds"], ppe_a)
            image = torch.from_numpy(np.asarray(image, dtype=np.float32))
            assert list(image.shape) == [1, HEIGHT, WIDTH, 3], image.shape
            final = per_step[-1]
            if store_steps:
                for i, s in enumerate(per_step):
                    put(f"{tag}_latents_step{i + 1}", s, f"latents after step {i + 1} (t={timesteps[i]:g}) from callback_on_step_end [1,4,12,16]")
                for i, u in enumerate(outs):
                    put(f"{tag}_unet_out_step{i + 1}", u, f"raw U-Net output at step {i + 1} (t={timesteps[i]:g}) on the CFG batch [uncond, cond] [2,4,12,16]")
            put(f"{tag}_latents_final", final, f"final latents (= latents after the last step) [1,4,12,16]; {tag}: {steps} steps, guidance {guidance:g}")
            if store_steps:
                put(f"{tag}_image", image[0], "pipe(..., output_type='np').images[0] [48,64,3] float32 in [0,1] = (vae.decode(final/0.13025).sample/2+0.5).clamp(0,1), HWC")
            put(f"{tag}_timesteps", torch.tensor(timesteps, dtype=torch.float32), f"{type(pipe.scheduler).__name__} timesteps for {steps} steps")
            info = {"scheduler": type(pipe.scheduler).__name__, "steps": steps, "guidance_scale": guidance, "cfg": batch == 2, "timesteps": timesteps, "init_noise_sigma": float(pipe.scheduler.init_noise_sigma)}
            if isinstance(pipe.scheduler, EulerDiscreteScheduler):
                info["sigmas"] = [float(x) for x in pipe.scheduler.sigmas]
            return final, image, info

        runs = {}
        euler_final, euler_image, runs["euler"] = run("euler", EulerDiscreteScheduler.from_config(euler.config), STEPS, GUIDANCE, STEPS)
        put("euler_sigmas", torch.tensor(runs["euler"]["sigmas"], dtype=torch.float32), "EulerDiscreteScheduler sigmas for 3 steps (incl. the final 0) [4]; init_noise_sigma = sqrt(sigmas[0]^2 + 1) for 'leading' spacing")
        _, _, runs["ddim"] = run("ddim", DDIMScheduler.from_config(euler.config), STEPS, GUIDANCE, STEPS)
        _, _, runs["nocfg_euler"] = run("nocfg_euler", EulerDiscreteScheduler.from_config(euler.config), NOCFG_STEPS, 0.0, NOCFG_STEPS, store_steps=False)
        pipe.scheduler = euler

        # VAE decode of the final Euler latents, as the pipeline does it.
        dec = vae.decode(euler_final / vae.config.scaling_factor).sample
        manual = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0]
        checks["euler_image_manual_decode_vs_pipeline_max_abs_diff"] = float((manual - euler_image[0]).abs().max())
        checks["euler_image_min_max"] = [float(euler_image.min()), float(euler_image.max())]
        checks["euler_image_fraction_clamped"] = float(((dec < -1) | (dec > 1)).float().mean())

        # ------------------------------------------------------------ tokenizer cases (both tokenizers)
        cases = []
        for p in make_tokenizer.tokenizer_case_prompts():
            cases.append(
                {
                    "prompt": p,
                    "input_ids": tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids,
                    "input_ids_2": tokenizer_2(p, padding="max_length", max_length=77, truncation=True).input_ids,
                }
            )

    checks.update(
        {
            "unet_out_std": unet_std,
            "text_encoder_keys_prefixed_with_text_model_by_this_script": te_prefixed,
            "text_encoder_first_keys": te_keys[:3],
            "text_encoder_2_first_keys": te2_keys[:3],
            "text_encoder_2_has_text_projection_weight_only": True,
            "text_encoder_2_pooling": "transformers %s: eos_token_id=%d != 2, so CLIPTextTransformer pools at the first position where input_ids == eos_token_id (the legacy eos_token_id==2 configs, e.g. the published SDXL one, pool at input_ids.argmax(-1); identical here and there because <|endoftext|> has the largest id and '!' the smallest)" % (transformers.__version__, eos),
            "unet_head_counts_per_level": [b.attentions[0].transformer_blocks[0].attn1.heads if hasattr(b, "attentions") else None for b in unet.down_blocks],
            "unet_transformer_depths": {
                "down": [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0 for b in unet.down_blocks],
                "mid": len(unet.mid_block.attentions[0].transformer_blocks),
                "up": [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0 for b in unet.up_blocks],
            },
        }
    )

    # ---------------------------------------------------------------- write
    st_path = os.path.join(fixture_dir, "golden.safetensors")
    safetensors.torch.save_file(out, st_path, metadata={"generator": "tools/make_sdxl_golden.py"})

    def cfg_of(m, keys):
        return {k: getattr(m.config, k) for k in keys}

    te_keys_cfg = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id"]
    info = {
        "generator": "tools/make_sdxl_golden.py",
        "model_dir": "tests/fixtures/sdxl/model",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "device": "cpu",
        "dtype": "float32 for every tensor except *_input_ids* (int64)",
        "params": {
            "prompt_a": PROMPT_A,
            "prompt_b": PROMPT_B,
            "negative_prompt": None,
            "negative_note": "negative_prompt=None and force_zeros_for_empty_prompt=true -> the unconditional prompt_embeds and pooled embeds are zeros (no text encoder call); CFG batch is [uncond, cond]",
            "height": HEIGHT,
            "width": WIDTH,
            "latents_shape": [1, 4, HEIGHT // 4, WIDTH // 4],
            "original_size": [HEIGHT, WIDTH],
            "crops_coords_top_left": [0, 0],
            "target_size": [HEIGHT, WIDTH],
            "add_time_ids": [HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH],
            "unet_timestep": UNET_TIMESTEP,
            "guidance_scale": GUIDANCE,
            "runs": runs,
            "seeds": SEEDS,
            "seed_note": "inputs are drawn with torch.Generator(cpu).manual_seed(seed); models built after torch.manual_seed(seed)",
            "weight_perturbation": "make_golden.perturb: norm weights 1+0.1*randn, biases 0.1*randn, all-zero weights +0.05*randn (seeds perturb_*); then unet.conv_out.weight *= unet_conv_out_gain",
            "unet_conv_out_gain": UNET_CONV_OUT_GAIN,
            "perturb_counts": perturb_stats,
            "scheduler_config": SCHEDULER_CONFIG,
            "ddim_scheduler": "DDIMScheduler.from_config(pipe.scheduler.config) (the Euler config above: leading spacing, steps_offset 1, set_alpha_to_one false, eta 0)",
            "vae": {"scaling_factor": vae.config.scaling_factor, "force_upcast": vae.config.force_upcast, "block_out_channels": list(vae.config.block_out_channels), "norm_num_groups": vae.config.norm_num_groups, "downsample_factor": 2 ** (len(vae.config.block_out_channels) - 1)},
            "unet": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in UNET_KW.items()},
            "unet_width_note": "block_out_channels [8,16,24] instead of the requested [32,48,64]: [32,48,64] makes a 2,643,780-parameter U-Net (10.6 MB) and the fixture must stay under 3 MB",
            "tokenizer": {"vocab_size": len(vocab), "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, "num_merges": len(merges), "model_max_length": tokenizer.model_max_length},
            "tokenizer_2": {"vocab": "identical to tokenizer/", "pad_token": PAD_2, "pad_token_id": tokenizer_2.pad_token_id},
            "text_encoder": cfg_of(text_encoder, te_keys_cfg),
            "text_encoder_2": cfg_of(text_encoder_2, te_keys_cfg),
        },
        "checks": checks,
        "tensors": {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "description": desc[name], "mean": float(t.double().mean()), "std": float(t.double().std()) if t.numel() > 1 else 0.0}
            for name, t in out.items()
        },
        "tokenizer_cases_note": "input_ids / input_ids_2 = tokenizer / tokenizer_2 (prompt, padding='max_length', max_length=77, truncation=True).input_ids",
        "tokenizer_cases": cases,
    }
    with open(os.path.join(fixture_dir, "golden.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # safetensors creates files 0600; make everything we wrote world-readable like the rest.
    for d, _, fs in os.walk(fixture_dir):
        for fn in fs:
            os.chmod(os.path.join(d, fn), 0o644)
    total = make_golden.folder_size(fixture_dir)
    msize = make_golden.folder_size(model_dir)
    print(f"unet_out std = {unet_std:.4f}  (mean {float(unet_out.mean()):.4f})")
    for tag, r in runs.items():
        print(f"{tag}: {r['scheduler']} timesteps {r['timesteps']}, init_noise_sigma {r['init_noise_sigma']:.4f}")
    print("checks:", json.dumps({k: v for k, v in checks.items() if "diff" in k or k.endswith("position")}))
    for name, t in out.items():
        print(f"  {name:40s} {str(list(t.shape)):16s} {str(t.dtype):12s} std={info['tensors'][name]['std']:.4f}")
    print(f"model folder {msize / 1e6:.2f} MB, golden files {(total - msize) / 1e6:.2f} MB, total tests/fixtures/sdxl {total / 1e6:.2f} MB")
    if total >= MAX_FIXTURE_BYTES:
        raise SystemExit(f"tests/fixtures/sdxl is {total} bytes >= {MAX_FIXTURE_BYTES}")
    if not 0.3 <= unet_std <= 3.0:
        print("WARNING: unet_out std outside [0.3, 3]", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
