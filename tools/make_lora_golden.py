#!/usr/bin/env python3
"""Golden fixture for LoRA adapters merged into the U-Net, produced by diffusers + peft.

One random (seeded) LoRA adapter for models/tiny-random's UNet2DConditionModel covers every
Linear / Conv2d of the U-Net (83 modules): attention to_q/to_k/to_v/to_out.0 (attn1, attn2),
ff.net.0.proj, ff.net.2, the transformers' proj_in/proj_out, every resnet's conv1, conv2,
conv_shortcut, time_emb_proj, conv_in, conv_out, the down/up samplers' conv and
time_embedding.linear_1/linear_2.  Rank 4 (rank 2 where the layer has fewer than 8 input or
output channels: conv_in, conv_out).  Alphas differ from the rank so that a wrong alpha handling
shows: the attention projections all get 2*rank (the file's most common alpha: diffusers 0.42.1
applies the most common alpha to kohya attention modules whatever their own .alpha, see
KOHYA_ATTN_ALPHA_NOTE), the other modules cycle through 2*rank, rank/2 and 0.75*rank.  Up weights
are random (non-zero): the output changes by ~55% at scale 1.  Conv LoRA: down is a conv with the
layer's kernel/stride/padding (rank output channels), up a 1x1 conv.  The merge being checked is

    W' = W + s * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(W.shape)

(for a Linear, flatten(1) is a no-op; for a conv, up is [out, rank, 1, 1], down [rank, in, kh, kw]).

Writes tests/fixtures/lora/
  diffusers.safetensors                 the adapter, diffusers/peft naming (unet.<module>.lora_A/B.weight)
                                        with the alphas in the `lora_adapter_metadata` header entry
                                        (what StableDiffusionPipeline.save_lora_weights writes)
  kohya.safetensors                     the same adapter, kohya sd-scripts naming
                                        (lora_unet_<module with . -> _>.lora_down/lora_up.weight, .alpha)
  text_encoder_only_key.safetensors     kohya.safetensors + one lora_te_... triple (no golden)
  golden.safetensors                    U-Net inputs/outputs without and with the adapter (scale 1, 0.5),
                                        three merged weights, a 3-step DDIM pipeline run at scale 0.8
  golden.json                           every tensor's meaning, the adapter's modules with rank/alpha,
                                        the file conventions, checks, versions

Every case loads the pipeline fresh from models/tiny-random and the adapter with
`pipe.load_lora_weights(<file>)`, then `pipe.fuse_lora(lora_scale=s)` (the goldens) and checks it
against `set_adapters(..., adapter_weights=s)` (unfused peft forward), against the kohya file and
against a merge done here by hand with the formula above; it also probes how diffusers reads alphas
(golden.json "probes").  Everything is float32 on CPU.  Deterministic: fixed seeds everywhere, and
the safetensors headers are written with sorted metadata, so a re-run reproduces every file byte
for byte.  30-45 s on 2 cores.

Usage: /work/venv/bin/python tools/make_lora_golden.py
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import peft
import safetensors
import safetensors.torch
import torch
import transformers
import diffusers
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as dlogging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "tiny-random")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures", "lora")

PROMPT_A = "a small red circle at the top left on a white background"
PROMPT_B = ""
UNET_TIMESTEP = 501
SCALES = [1.0, 0.5]
PIPE_SCALE = 0.8
PIPE_STEPS = 3
PIPE_GUIDANCE = 5.0
IMAGE_SIZE = 64
RANK = 4
NARROW_RANK = 2  # layers with fewer than 8 input or output channels (conv_in: 4 in, conv_out: 4 out)
# alpha as a multiple of the rank: attention to_q/to_k/to_v/to_out.0 all get ATTN_ALPHA_FACTOR (which
# makes their alpha the most common one; see KOHYA_ATTN_ALPHA_NOTE), the other modules cycle through
# ALPHA_FACTORS in U-Net registration order.
ATTN_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
ATTN_ALPHA_FACTOR = 2.0
ALPHA_FACTORS = [2.0, 0.5, 0.75]
UP_GAIN = 0.1  # up ~ UP_GAIN * randn / sqrt(rank); down ~ randn / sqrt(fan_in)
KOHYA_ATTN_ALPHA_NOTE = (
    "diffusers 0.42.1 converts a kohya attention key lora_unet_..._attn1_to_q.lora_down.weight to "
    "'...attn1.processor.to_q_lora.down.weight' and names its alpha '<that>.alpha'; get_peft_kwargs then uses "
    "'...attn1.processor.to_q_lora.down.weight' as the alpha_pattern key, which matches no module (peft: "
    "RuntimeWarning 'alpha_pattern keys did not match any targeted module'), so attention to_q/to_k/to_v/to_out.0 "
    "get LoraConfig.lora_alpha = the most common alpha of the file instead of their own .alpha. Other modules "
    "(ff, proj_in/out, resnets, samplers, conv_in/out, time_embedding) keep their own alpha. To keep diffusers' kohya "
    "output equal to the kohya semantics (scaling = own alpha / rank), every attention projection here has the most "
    "common alpha (2*rank = 8). See probes.kohya_non_default_attention_alpha. Veil should apply each module's own .alpha."
)
MERGED_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",  # attention linear (on the context)
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv
    "down_blocks.1.resnets.0.conv_shortcut",  # 1x1 conv
]
TE_MODULE = "text_model.encoder.layers.0.self_attn.q_proj"

SEEDS = {
    "adapter": 3000,
    "te_adapter": 3001,
    "unet_sample": 3002,
    "pipe_latents": 3003,
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Capture(logging.Handler):
    """Collects diffusers / peft log records (warnings and up) while a case runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(f"{record.name}: {record.getMessage()}")


CAPTURE = Capture()


def run_captured(fn):
    """Runs fn(); returns (result, [warning/log messages])."""
    CAPTURE.records = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fn()
    msgs = CAPTURE.records + [f"{x.category.__name__}: {x.message}" for x in w]
    return res, msgs


def load_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDIMScheduler), type(pipe.scheduler)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.eval()
        assert next(m.parameters()).dtype == torch.float32
    return pipe


def lora_targets(unet) -> list[dict]:
    """Every nn.Linear / nn.Conv2d of the U-Net, in registration order, with its LoRA rank/alpha."""
    mods = []
    n_other = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            kind, fin, fout = "linear", m.in_features, m.out_features
            extra = {}
        elif isinstance(m, torch.nn.Conv2d):
            assert m.groups == 1 and m.dilation == (1, 1), name
            kind, fin, fout = "conv2d", m.in_channels, m.out_channels
            extra = {"kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding)}
        else:
            continue
        rank = NARROW_RANK if min(fin, fout) < 8 else RANK
        if ATTN_PROJ.search(name):
            alpha = ATTN_ALPHA_FACTOR * rank
        else:
            alpha = ALPHA_FACTORS[n_other % len(ALPHA_FACTORS)] * rank
            n_other += 1
        mods.append({"module": name, "kind": kind, "in": fin, "out": fout, **extra, "rank": rank, "alpha": alpha,
                     "alpha_over_rank": alpha / rank, "weight_shape": list(m.weight.shape)})
    return mods


def make_adapter(mods: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (down [r, in(, kh, kw)], up [out, r(, 1, 1)])."""
    g = gen(SEEDS["adapter"])
    ad = {}
    for m in mods:
        r = m["rank"]
        if m["kind"] == "linear":
            dshape, ushape, fan_in = (r, m["in"]), (m["out"], r), m["in"]
        else:
            kh, kw = m["kernel"]
            dshape, ushape, fan_in = (r, m["in"], kh, kw), (m["out"], r, 1, 1), m["in"] * kh * kw
        down = torch.randn(dshape, generator=g) / fan_in**0.5
        up = UP_GAIN * torch.randn(ushape, generator=g) / r**0.5
        ad[m["module"]] = (down.contiguous(), up.contiguous())
    return ad


def manual_merge(base_sd: dict, mods: list[dict], ad: dict, scale: float) -> dict:
    sd = {k: v.clone() for k, v in base_sd.items()}
    for m in mods:
        down, up = ad[m["module"]]
        w = sd[m["module"] + ".weight"]
        delta = (up.flatten(1).double() @ down.flatten(1).double()).reshape(w.shape)
        sd[m["module"] + ".weight"] = (w.double() + scale * m["alpha_over_rank"] * delta).to(torch.float32)
    return sd


def canonical_header(path: str) -> None:
    """safetensors writes `__metadata__` from a Rust HashMap, so a file with more than one metadata entry
    comes out in a different byte order on every run.  Rewrite the header with sorted metadata keys (the
    tensor entries and data are unchanged) so that re-running the script reproduces the files byte for byte."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    new = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | header
    text = json.dumps(new, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with safetensors.safe_open(path, "pt") as f:  # still readable, same metadata
        assert (f.metadata() or None) == (meta or None), path


def load_file_nometa(path: str) -> dict:
    return safetensors.torch.load_file(path)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def main() -> None:
    torch.set_grad_enabled(False)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    os.makedirs(OUT_DIR, exist_ok=True)
    dlogging.set_verbosity_warning()
    dlogging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dlogging.disable_default_handler()
    dlogging.get_logger("diffusers").addHandler(CAPTURE)
    logging.getLogger("peft").addHandler(CAPTURE)

    paths = {k: os.path.join(OUT_DIR, f"{k}.safetensors") for k in ("diffusers", "kohya", "text_encoder_only_key", "golden")}
    tensors: dict[str, torch.Tensor] = {}
    desc: dict[str, str] = {}
    checks: dict = {}
    logs: dict[str, list[str]] = {}

    def put(name, t, what):
        tensors[name] = t.detach().to(torch.float32).contiguous()
        desc[name] = what

    # ---------------------------------------------------------------- base + inputs
    pipe = load_pipe()
    base_sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    mods = lora_targets(pipe.unet)
    ad = make_adapter(mods)

    tokenizer = pipe.tokenizer

    def ids_for(prompt):
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    hid_a = pipe.text_encoder(ids_for(PROMPT_A))[0]
    hid_b = pipe.text_encoder(ids_for(PROMPT_B))[0]
    context = torch.cat([hid_b, hid_a], dim=0)
    width = int(pipe.text_encoder.config.hidden_size)
    sample = torch.randn(2, 4, 8, 8, generator=gen(SEEDS["unet_sample"]))
    t = torch.tensor([UNET_TIMESTEP], dtype=torch.int64)

    def unet_call(p):
        return p.unet(sample, t, encoder_hidden_states=context).sample

    base_out = unet_call(pipe)
    put("unet_sample", sample, f"torch.randn(2,4,8,8, generator=Generator().manual_seed({SEEDS['unet_sample']}))")
    put("unet_timestep", t.to(torch.float32), f"[1] float32 holding {UNET_TIMESTEP}; passed to the U-Net as int64 tensor([{UNET_TIMESTEP}]) (broadcast to the batch)")
    put("unet_context", context, f"cat([text_encoder(ids(''))[0], text_encoder(ids({PROMPT_A!r}))[0]], dim=0) [2,77,{width}] (uncond first, as in CFG); ids = tokenizer(p, padding='max_length', max_length=77, truncation=True)")
    put("unet_out_base", base_out, "unet(unet_sample, 501, encoder_hidden_states=unet_context).sample [2,4,8,8], no adapter")
    del pipe

    # ---------------------------------------------------------------- (a) diffusers / peft file
    # The alphas go into the LoraConfig saved as JSON in the safetensors header (`lora_adapter_metadata`),
    # exactly as diffusers' training scripts save it: pipe.save_lora_weights(..., unet_lora_adapter_metadata=
    # LoraConfig.to_dict()).  Patterns hold full module paths (peft matches them as regex suffixes of the
    # module name: re.match(rf"(.*\.)?({key})$", name)).
    alpha_counts: dict[float, int] = {}
    for m in mods:
        alpha_counts[m["alpha"]] = alpha_counts.get(m["alpha"], 0) + 1
    default_alpha = max(alpha_counts, key=lambda a: (alpha_counts[a], -a))
    lora_config = peft.LoraConfig(
        r=RANK,
        lora_alpha=default_alpha,
        rank_pattern={m["module"]: m["rank"] for m in mods if m["rank"] != RANK},
        alpha_pattern={m["module"]: m["alpha"] for m in mods if m["alpha"] != default_alpha},
        target_modules=[m["module"] for m in mods],
        init_lora_weights=True,
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        bias="none",
    )
    diff_sd = {}
    for m in mods:
        down, up = ad[m["module"]]
        diff_sd[f"{m['module']}.lora_A.weight"] = down
        diff_sd[f"{m['module']}.lora_B.weight"] = up
    config_dict = lora_config.to_dict()
    config_dict["target_modules"] = sorted(config_dict["target_modules"])  # a set: fix its order
    tmp_dir = os.path.join(OUT_DIR, ".tmp-save")
    StableDiffusionPipeline.save_lora_weights(tmp_dir, unet_lora_layers=diff_sd, weight_name="diffusers.safetensors",
                                              unet_lora_adapter_metadata=config_dict)
    os.replace(os.path.join(tmp_dir, "diffusers.safetensors"), paths["diffusers"])
    os.rmdir(tmp_dir)
    canonical_header(paths["diffusers"])
    with safetensors.safe_open(paths["diffusers"], "pt") as f:
        diff_header = f.metadata()
        diff_keys = list(f.keys())
    assert all(k.startswith("unet.") and (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")) for k in diff_keys)
    lora_meta = json.loads(diff_header["lora_adapter_metadata"])

    # ---------------------------------------------------------------- (b) kohya file, (c) + text encoder triple
    kohya_sd = {}
    for m in mods:
        down, up = ad[m["module"]]
        name = "lora_unet_" + m["module"].replace(".", "_")
        kohya_sd[f"{name}.lora_down.weight"] = down
        kohya_sd[f"{name}.lora_up.weight"] = up
        kohya_sd[f"{name}.alpha"] = torch.tensor(m["alpha"], dtype=torch.float32)  # 0-d, as sd-scripts writes it
    safetensors.torch.save_file(kohya_sd, paths["kohya"], metadata={"format": "pt", "ss_network_module": "networks.lora",
                                                                    "ss_network_dim": str(RANK), "generator": "tools/make_lora_golden.py"})
    g = gen(SEEDS["te_adapter"])
    te_name = "lora_te_" + TE_MODULE.replace(".", "_")
    te_sd = dict(kohya_sd)
    te_sd[f"{te_name}.lora_down.weight"] = (torch.randn(RANK, width, generator=g) / width**0.5).contiguous()
    te_sd[f"{te_name}.lora_up.weight"] = (UP_GAIN * torch.randn(width, RANK, generator=g) / RANK**0.5).contiguous()
    te_sd[f"{te_name}.alpha"] = torch.tensor(RANK / 2, dtype=torch.float32)
    safetensors.torch.save_file(te_sd, paths["text_encoder_only_key"], metadata={"format": "pt", "generator": "tools/make_lora_golden.py"})
    canonical_header(paths["kohya"])
    canonical_header(paths["text_encoder_only_key"])

    # ---------------------------------------------------------------- U-Net with the adapter
    def with_adapter(file, scale, mode):
        """Fresh pipeline + adapter from `file`; mode 'fuse' (fuse_lora + unload_lora_weights, plain
        U-Net left with merged weights) or 'set_adapters' (unfused peft layers)."""
        p = load_pipe()
        _, msgs = run_captured(lambda: p.load_lora_weights(file, adapter_name="veil"))
        if mode == "fuse":
            _, m2 = run_captured(lambda: (p.fuse_lora(lora_scale=scale), p.unload_lora_weights()))
        else:
            _, m2 = run_captured(lambda: p.set_adapters(["veil"], adapter_weights=[scale]))
        return p, msgs + m2

    outs = {}
    merged_by = {}
    for fname in ("diffusers", "kohya"):
        for s in SCALES:
            p, msgs = with_adapter(paths[fname], s, "fuse")
            logs[f"{fname}/fuse/scale_{s}"] = msgs
            assert not any(".lora_" in k or "base_layer" in k for k in p.unet.state_dict()), "unload_lora_weights left LoRA layers"
            outs[(fname, "fuse", s)] = unet_call(p)
            merged_by[(fname, s)] = {k: v.clone() for k, v in p.unet.state_dict().items()}
            del p
            if fname == "kohya":
                continue  # kohya through set_adapters adds nothing (its fused weights equal the diffusers file's)
            p, msgs = with_adapter(paths[fname], s, "set_adapters")
            logs[f"{fname}/set_adapters/scale_{s}"] = msgs
            n_lora = sum(1 for _, mm in p.unet.named_modules() if isinstance(mm, peft.tuners.lora.LoraLayer))
            checks[f"{fname}_lora_layers_injected"] = n_lora
            outs[(fname, "set_adapters", s)] = unet_call(p)
            del p

    # The formula, by hand, on the plain U-Net.
    p = load_pipe()
    for s in SCALES:
        sd = manual_merge(base_sd, mods, ad, s)
        p.unet.load_state_dict(sd)
        outs[("manual", "fuse", s)] = unet_call(p)
        for fname in ("diffusers", "kohya"):
            checks[f"merged_weights_{fname}_vs_manual_scale_{s}_max_abs"] = max(maxabs(merged_by[(fname, s)][k], sd[k]) for k in sd)
            changed = [m["module"] for m in mods if not torch.equal(merged_by[(fname, s)][m["module"] + ".weight"], base_sd[m["module"] + ".weight"])]
            checks[f"modules_changed_by_{fname}_scale_{s}"] = len(changed)
            untouched = [k for k in sd if not any(k == m["module"] + ".weight" for m in mods)]
            assert all(torch.equal(merged_by[(fname, s)][k], base_sd[k]) for k in untouched), f"{fname}: a non-target tensor changed"
        if s == 1.0:
            for layer in MERGED_LAYERS:
                m = next(x for x in mods if x["module"] == layer)
                put(f"merged/{layer}.weight", merged_by[("diffusers", 1.0)][layer + ".weight"],
                    f"{m['kind']} {m['weight_shape']}: the U-Net weight after pipe.load_lora_weights(diffusers.safetensors); "
                    f"fuse_lora(lora_scale=1.0); unload_lora_weights() = W + 1.0*({m['alpha']}/{m['rank']})*up@down")
    del p

    for s in SCALES:
        ref = outs[("diffusers", "fuse", s)]
        for key in [("diffusers", "set_adapters", s), ("kohya", "fuse", s), ("manual", "fuse", s)]:
            checks[f"unet_out_scale_{s}: {key[0]}/{key[1]} vs diffusers/fuse max_abs"] = maxabs(outs[key], ref)
        put(f"unet_out_scale_{s}", ref,
            f"unet(unet_sample, 501, unet_context).sample [2,4,8,8] after pipe.load_lora_weights(diffusers.safetensors); pipe.fuse_lora(lora_scale={s})")
    rel_change = {str(s): rel(outs[("diffusers", "fuse", s)], base_out) for s in SCALES}

    # ---------------------------------------------------------------- probes of diffusers' alpha handling
    def implied_alphas(source, probe_mods):
        """Loads `source` (path or dict) into a fresh pipeline, fuses at scale 1 and returns, per module,
        the alpha that the merged weight implies: rank * <W'-W, up@down> / <up@down, up@down>."""
        pp = load_pipe()
        try:
            _, msgs = run_captured(lambda: (pp.load_lora_weights(source, adapter_name="probe"), pp.fuse_lora(lora_scale=1.0),
                                            pp.unload_lora_weights()))
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        sd = pp.unet.state_dict()
        res = {}
        for name in probe_mods:
            m = next(x for x in mods if x["module"] == name)
            down, up = ad[name]
            d = (up.flatten(1).double() @ down.flatten(1).double()).flatten()
            delta = (sd[name + ".weight"].double() - base_sd[name + ".weight"].double()).flatten()
            res[name] = round(float(m["rank"] * (delta @ d) / (d @ d)), 4)
        return {"implied_alpha": res, "warnings": [x[:600] for x in msgs if "CLIPTextModel" not in x]}

    probe_attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    probe_ff = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"
    probe_conv = "down_blocks.0.resnets.0.conv1"
    probe_set = {probe_attn: 2.0, probe_ff: 5.0, probe_conv: 6.0}
    ksd = dict(kohya_sd)
    for name, a in probe_set.items():
        ksd["lora_unet_" + name.replace(".", "_") + ".alpha"] = torch.tensor(a)
    probes = {
        "kohya_non_default_attention_alpha": {
            "what": f"kohya.safetensors with the .alpha of these modules changed to {probe_set} (the most common alpha "
            f"stays {2.0 * RANK}); the alpha diffusers actually applies, read back from the fused weight",
            **implied_alphas(ksd, list(probe_set)),
        },
        "diffusers_without_metadata": {
            "what": "the lora_A/lora_B tensors of diffusers.safetensors passed as a dict (no lora_adapter_metadata): "
            "the alpha diffusers applies",
            **implied_alphas(dict(load_file_nometa(paths["diffusers"])), ["conv_in", probe_attn, probe_conv]),
        },
        "diffusers_alpha_keys": {
            "what": f"the tensors of diffusers.safetensors (as a dict) plus a kohya-style 'unet.{probe_attn}.alpha' tensor",
            **implied_alphas({**load_file_nometa(paths["diffusers"]), f"unet.{probe_attn}.alpha": torch.tensor(2.0)}, [probe_attn]),
        },
    }

    # ---------------------------------------------------------------- (c): does diffusers load it?
    p = load_pipe()
    te_before = p.text_encoder(ids_for(PROMPT_A))[0]
    try:
        _, msgs = run_captured(lambda: p.load_lora_weights(paths["text_encoder_only_key"], adapter_name="veil"))
        te_after = p.text_encoder(ids_for(PROMPT_A))[0]
        te_result = {"loaded": True, "warnings": msgs, "text_hidden_rel_change": rel(te_after, te_before),
                     "unet_out_scale_1.0_max_abs_vs_golden": maxabs(unet_call(p), outs[("diffusers", "set_adapters", 1.0)])}
    except Exception as e:  # noqa: BLE001
        te_result = {"loaded": False, "error": f"{type(e).__name__}: {e}"}
    del p
    # Why: diffusers infers the text-encoder key style from a 'to_out_lora' or 'lora_linear_layer' key
    # (utils/state_dict_utils.convert_state_dict_to_peft); a kohya text-encoder LoRA that has out_proj loads.
    te_full = dict(te_sd)
    for proj in ("k_proj", "v_proj", "out_proj"):
        n = te_name.replace("q_proj", proj)
        te_full[f"{n}.lora_down.weight"] = te_sd[f"{te_name}.lora_down.weight"]
        te_full[f"{n}.lora_up.weight"] = te_sd[f"{te_name}.lora_up.weight"]
        te_full[f"{n}.alpha"] = te_sd[f"{te_name}.alpha"]
    p = load_pipe()
    try:
        run_captured(lambda: p.load_lora_weights(te_full, adapter_name="veil"))
        n_te = sum(1 for _, mm in p.text_encoder.named_modules() if isinstance(mm, peft.tuners.lora.LoraLayer))
        te_result["same_plus_k_v_out_proj_triples"] = f"loaded ({n_te} LoRA layers in the text encoder)"
    except Exception as e:  # noqa: BLE001
        te_result["same_plus_k_v_out_proj_triples"] = f"{type(e).__name__}: {e}"
    del p

    # ---------------------------------------------------------------- full pipeline at scale 0.8
    p, msgs = with_adapter(paths["diffusers"], PIPE_SCALE, "fuse")
    logs[f"diffusers/fuse/scale_{PIPE_SCALE} (pipeline)"] = msgs
    lat0 = torch.randn(1, 4, 8, 8, generator=gen(SEEDS["pipe_latents"]))
    steps = []

    def cb(pp, i, tstep, kw):
        steps.append(kw["latents"].clone())
        return kw

    common = dict(prompt=PROMPT_A, num_inference_steps=PIPE_STEPS, guidance_scale=PIPE_GUIDANCE, eta=0.0,
                  height=IMAGE_SIZE, width=IMAGE_SIZE)
    lat_final = p(**common, latents=lat0.clone(), output_type="latent", callback_on_step_end=cb,
                  callback_on_step_end_tensor_inputs=["latents"]).images
    timesteps = [int(x) for x in p.scheduler.timesteps]
    assert len(steps) == PIPE_STEPS and torch.equal(steps[-1], lat_final)
    image = p(**common, latents=lat0.clone(), output_type="np").images[0]
    del p
    pb = load_pipe()
    image_base = pb(**common, latents=lat0.clone(), output_type="np").images[0]
    del pb
    put("pipe/latents", lat0, f"torch.randn(1,4,8,8, generator=Generator().manual_seed({SEEDS['pipe_latents']})); the `latents` given to the pipeline")
    put("pipe/latents_steps", torch.cat(steps, 0), f"[{PIPE_STEPS},4,8,8] latents after every DDIM step (callback_on_step_end); timesteps {timesteps}")
    put("pipe/final_latents", lat_final, "pipe(..., output_type='latent').images [1,4,8,8] (= last entry of pipe/latents_steps)")
    put("pipe/image", torch.from_numpy(image), "pipe(..., output_type='np').images[0] [64,64,3] in [0,1] (float32)")
    checks["pipe_image_mean_abs_change_vs_no_adapter"] = float(np.abs(image - image_base).mean())

    # ---------------------------------------------------------------- write
    for v in tensors.values():
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
    safetensors.torch.save_file(tensors, paths["golden"], metadata={"generator": "tools/make_lora_golden.py"})
    files = {k: os.path.relpath(v, ROOT) for k, v in paths.items()}
    info = {
        "generator": "tools/make_lora_golden.py",
        "description": "A random LoRA adapter on every Linear/Conv2d of models/tiny-random's U-Net, merged by diffusers "
        "(pipe.load_lora_weights(file); pipe.fuse_lora(lora_scale=s)) on a pipeline loaded fresh from models/tiny-random "
        "for every case. Merge: W' = W + s*(alpha/rank)*(up.flatten(1) @ down.flatten(1)).reshape(W.shape), for "
        "Linear and Conv2d alike (down: conv with the layer's kernel/stride/padding, up: 1x1 conv); no rsLoRA, no DoRA, "
        "no LoRA bias. peft scales a conv LoRA exactly like a linear one (checks.merged_weights_*: every merged weight "
        "equals the formula, evaluated in float64, to float32 rounding). Float32 CPU.",
        "files": files,
        "model": "models/tiny-random",
        "prompt_a": PROMPT_A,
        "prompt_b": PROMPT_B,
        "unet_timestep": UNET_TIMESTEP,
        "scales": SCALES,
        "fuse_api": "goldens use pipe.load_lora_weights(path, adapter_name='veil'); pipe.fuse_lora(lora_scale=s) "
        "(then pipe.unload_lora_weights(), which keeps the fused weights); checked against "
        "pipe.set_adapters(['veil'], adapter_weights=[s]) without fusing (see checks)",
        "pipeline": {
            "class": "StableDiffusionPipeline", "scheduler": "DDIMScheduler (the folder's config)", "lora_file": files["diffusers"],
            "lora_scale": PIPE_SCALE, "prompt": PROMPT_A, "negative_prompt": None, "num_inference_steps": PIPE_STEPS,
            "guidance_scale": PIPE_GUIDANCE, "eta": 0.0, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "timesteps": timesteps,
        },
        "seeds": SEEDS,
        "tensors": {n: {"shape": list(v.shape), "dtype": "float32", "meaning": desc[n]} for n, v in tensors.items()},
        "relative_change_unet_out_vs_base": {**rel_change, "definition": "||unet_out_scale_s - unet_out_base||_2 / ||unet_out_base||_2"},
        "adapter": {
            "rank_rule": f"{RANK}, or {NARROW_RANK} where the layer has fewer than 8 input or output channels",
            "alpha_rule": f"alpha = {ALPHA_FACTORS}[i % {len(ALPHA_FACTORS)}] * rank, i = index in U-Net registration order (below)",
            "init": f"down = randn/sqrt(fan_in) (fan_in = in*kh*kw), up = {UP_GAIN}*randn/sqrt(rank), one Generator seeded "
            f"{SEEDS['adapter']}, down then up per module in the order below",
            "n_modules": len(mods),
            "modules": mods,
        },
        "conventions": {
            "diffusers.safetensors": {
                "keys": "unet.<module path>.lora_A.weight = down [rank, in] or [rank, in, kh, kw]; "
                "unet.<module path>.lora_B.weight = up [out, rank] or [out, rank, 1, 1]",
                "alpha": "safetensors header (__metadata__) entry 'lora_adapter_metadata': a JSON string of the LoraConfig "
                "with every key prefixed 'unet.' (what pipe.save_lora_weights(..., unet_lora_adapter_metadata=cfg.to_dict()) "
                "writes). diffusers 0.42.1 reads it (utils/state_dict_utils._load_sft_state_dict_metadata), strips 'unet.' "
                "and calls peft.LoraConfig(**it). Per module: alpha = alpha_pattern[key] for the first key with "
                "re.match(rf'(.*\\.)?({key})$', module) else lora_alpha; rank likewise from rank_pattern / r (equals "
                "lora_B.shape[1]); scaling = alpha/rank (use_rslora false). Here the patterns hold full module paths.",
                "lora_adapter_metadata_unet": {k: lora_meta[k] for k in sorted(lora_meta) if k.split(".", 1)[1] in
                                               ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")},
                "without_metadata": "a plain lora_A/lora_B file without the header entry gets alpha = rank for every "
                "module (scaling 1: utils/peft_utils.get_peft_kwargs mirrors the ranks into the alphas); '.alpha' tensors "
                "are not accepted in this layout: every key must contain 'lora' (ValueError 'Invalid LoRA checkpoint'). See "
                "probes.diffusers_without_metadata and probes.diffusers_alpha_keys",
            },
            "kohya.safetensors": {
                "keys": "lora_unet_<module path with '.' -> '_'>.lora_down.weight (= lora_A), .lora_up.weight (= lora_B), "
                ".alpha (0-d float32)",
                "alpha": "per-module '.alpha' tensor; scaling = alpha / rank (rank = lora_down.shape[0])",
                "diffusers_conversion": "lora_state_dict detects all keys starting lora_unet_/lora_te_ and calls "
                "_convert_non_diffusers_lora_to_diffusers: '_' -> '.', then known names restored (down_blocks, "
                "transformer_blocks, to_q/k/v, to_out.0, proj_in/out, time_emb_proj, conv_shortcut, conv_in/out, "
                "time_embedding.linear_1/2); alphas become network_alphas -> LoraConfig lora_alpha (most common) + alpha_pattern. "
                "No module is dropped or misplaced: all of them, incl. conv_in, conv_out, time_embedding.linear_1/2, the "
                "samplers' conv, conv_shortcut and time_emb_proj, land on their U-Net module (checks.modules_changed_by_kohya_*, "
                "checks.merged_weights_kohya_vs_manual_*). Caveat: attention alphas, see kohya_attention_alpha_note",
            },
            "text_encoder_only_key.safetensors": f"kohya.safetensors plus {te_name}.lora_down.weight [{RANK},{width}], "
            f".lora_up.weight [{width},{RANK}], .alpha = {RANK / 2} (0-d): a text-encoder LoRA entry (Veil refuses it); no golden",
        },
        "checks": checks,
        "probes": probes,
        "kohya_attention_alpha_note": KOHYA_ATTN_ALPHA_NOTE,
        "text_encoder_only_key_in_diffusers": te_result,
        "diffusers_logs": logs,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
    }
    json_path = os.path.join(OUT_DIR, "golden.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, ensure_ascii=False)
        f.write("\n")
    all_files = list(paths.values()) + [json_path]
    for pth in all_files:
        os.chmod(pth, 0o644)

    # ---------------------------------------------------------------- report + gates
    for k, v in checks.items():
        print(f"  {k}: {v}", file=sys.stderr)
    for k, v in logs.items():
        for msg in v:
            print(f"  [{k}] {msg[:300]}", file=sys.stderr)
    print(f"probes: {json.dumps(probes, indent=1)[:3000]}", file=sys.stderr)
    print(f"text_encoder_only_key in diffusers: {json.dumps(te_result)[:400]}", file=sys.stderr)
    print(f"relative change of unet_out vs base: {rel_change}", file=sys.stderr)
    for name, v in tensors.items():
        print(f"  {name:72s} {str(list(v.shape)):16s} mean={float(v.mean()):.4f} std={float(v.std()) if v.numel() > 1 else 0.0:.4f}", file=sys.stderr)
    total = sum(os.path.getsize(pth) for pth in all_files)
    for pth in all_files:
        print(f"wrote {os.path.relpath(pth, ROOT)} ({os.path.getsize(pth)} bytes)", file=sys.stderr)
    print(f"total {total / 1e6:.2f} MB", file=sys.stderr)
    # the two files through the same API must agree to 1e-6; unfused forward / the hand merge (float64) to 1e-5
    bad = [k for k, v in checks.items() if k.startswith("unet_out_scale") and v > (1e-6 if "kohya/fuse vs" in k else 1e-5)]
    bad += [k for k, v in checks.items() if k.startswith("merged_weights") and v > 1e-6]
    bad += [k for k, v in checks.items() if k.startswith("modules_changed") and v != len(mods)]
    if bad or total > 2_000_000 or rel_change["1.0"] < 0.05:
        print(f"FAILED: {bad}, total {total}, rel change {rel_change}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
