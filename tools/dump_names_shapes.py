#!/usr/bin/env python3
"""Write the published SD1.5 / SD2.1 / SDXL component configs and their parameter names + shapes.

No download: the configs below are transcribed from the official repositories
  runwayml/stable-diffusion-v1-5             (unet, text_encoder, vae, scheduler)
  stabilityai/stable-diffusion-2-1           (unet, text_encoder, vae, scheduler)
  stabilityai/stable-diffusion-xl-base-1.0   (unet, text_encoder, text_encoder_2, vae, scheduler)
Each model is then instantiated from its config on the meta device (accelerate's
`init_empty_weights`, no memory allocated) and its `state_dict()` names and shapes - exactly the
keys `save_pretrained` would write, non-persistent buffers such as CLIP's position_ids excluded;
CLIP keys carry the `text_model.` prefix of the published checkpoints (SDXL's text_encoder_2, a
CLIPTextModelWithProjection, also has `text_projection.weight`) -
are written as a JSON list of [name, [shape...]] in state_dict order.  Parameter counts are
checked against the published ones (EXPECTED_PARAMS); a mismatch means a config key is wrong.

Outputs
  models/configs/<sd15|sd21|sdxl>/{unet,text_encoder,vae}/config.json
  models/configs/sdxl/text_encoder_2/config.json
  models/configs/<sd15|sd21|sdxl>/scheduler/scheduler_config.json
  models/configs/<sd15|sd21|sdxl>/{unet,text_encoder,vae}.params.json
  models/configs/sdxl/text_encoder_2.params.json

Usage: python3 tools/dump_names_shapes.py [--root <repo root>]   (exits 1 if a parameter count differs)
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD15 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": _DOWN,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": _UP,
    },
    "text_encoder": {
        "_name_or_path": "openai/clip-vit-large-patch14",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
        "vocab_size": 49408,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        # Not present in the original file (diffusers 0.6 predates the key); this is the default
        # diffusers fills in, written out explicitly so that a config reader need not know it.
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "scheduler": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
}

SD21 = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.10.0.dev0",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": _DOWN,
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 96,
        "up_block_types": _UP,
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    "text_encoder": {
        "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "pad_token_id": 1,
        "projection_dim": 512,
        "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0",
        "vocab_size": 49408,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.8.0",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 768,
        "scaling_factor": 0.18215,  # see SD15 note
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "scheduler": {
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
    },
}

# stabilityai/stable-diffusion-xl-base-1.0 (model_index.json: StableDiffusionXLPipeline,
# force_zeros_for_empty_prompt true).
SDXL = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        # Legacy diffusers naming: these are head *counts* (head dim 64 everywhere).
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    },
    # OpenAI CLIP ViT-L/14 text tower, as in SD1.5.
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "pad_token_id": 1,
        "projection_dim": 768,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
        "vocab_size": 49408,
    },
    # OpenCLIP ViT-bigG/14 text tower with its projection (CLIPTextModelWithProjection).
    # eos_token_id 2 is the legacy value: transformers then pools at input_ids.argmax(-1), which is
    # the first <|endoftext|> (49407, the largest id; tokenizer_2 pads with "!" = 0).
    "text_encoder_2": {
        "architectures": ["CLIPTextModelWithProjection"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "pad_token_id": 1,
        "projection_dim": 1280,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
        "vocab_size": 49408,
    },
    # The SDXL VAE: SD's architecture, retrained; decode in float32 (force_upcast).
    "vae": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.20.0.dev0",
        "_name_or_path": "../sdxl-vae/",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "scheduler": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
}

MODELS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL}

# Published parameter counts (model.parameters(), float weights only; no buffers).
EXPECTED_PARAMS = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd21": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863},
}


def write_json(path: str, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def names_shapes(component: str, cfg: dict):
    from accelerate import init_empty_weights

    with init_empty_weights():
        if component in ("text_encoder", "text_encoder_2"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            c = {k: v for k, v in cfg.items() if k not in ("_name_or_path", "architectures", "torch_dtype", "transformers_version")}
            cls = CLIPTextModelWithProjection if cfg.get("architectures") == ["CLIPTextModelWithProjection"] else CLIPTextModel
            model = cls(CLIPTextConfig(**c))
        elif component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(cfg)
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(cfg)
        else:
            raise ValueError(component)
    sd = model.state_dict()  # == what save_pretrained writes (persistent params + buffers)
    nparams = sum(p.numel() for p in model.parameters())
    buffers = [n for n, _ in model.named_buffers()]
    prefix = ""
    if component == "text_encoder" and not any(k.startswith("text_model.") for k in sd):
        # transformers >= 5 flattened CLIPTextModel (no `text_model` submodule) and strips the
        # prefix when loading; the published SD checkpoints (and transformers < 5) use it.
        prefix = "text_model."
    if component == "text_encoder_2":
        # CLIPTextModelWithProjection keeps its `text_model` submodule: already the published names.
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd), list(sd)[:3]
    return [[prefix + k, list(v.shape)] for k, v in sd.items()], nparams, buffers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")))
    args = ap.parse_args()
    mismatches = []
    for tag, comps in MODELS.items():
        base = os.path.join(args.root, "models", "configs", tag)
        for comp, cfg in comps.items():
            fname = "scheduler_config.json" if comp == "scheduler" else "config.json"
            write_json(os.path.join(base, comp, fname), cfg)
        for comp in (c for c in comps if c != "scheduler"):
            entries, nparams, buffers = names_shapes(comp, comps[comp])
            path = os.path.join(base, f"{comp}.params.json")
            with open(path, "w", encoding="utf-8") as f:
                # one entry per line: diff-friendly and still a plain JSON list
                f.write("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
            nstate = sum(int(__import__("math").prod(s)) for _, s in entries)
            expected = EXPECTED_PARAMS.get(tag, {}).get(comp)
            check = "" if expected is None else ("  [published count: OK]" if nparams == expected else f"  [MISMATCH: published {expected:,}]")
            if expected is not None and nparams != expected:
                mismatches.append(f"{tag}/{comp}")
            print(f"{tag}/{comp}: {len(entries)} tensors, {nparams:,} parameters, {nstate:,} state-dict elements; buffers: {buffers or 'none'}{check}")
    if mismatches:
        raise SystemExit(f"parameter counts differ from the published ones: {', '.join(mismatches)}")


if __name__ == "__main__":
    main()
