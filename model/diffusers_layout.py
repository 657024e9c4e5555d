"""The diffusers layout of a Wan DiT (`Wan2.1-*-Diffusers/transformer`: `WanTransformer3DModel`
config and key names), both ways.

The official releases (and `WanModel`) name a block's layers `self_attn.q`, `cross_attn.k_img`,
`ffn.0`, `modulation`, `norm3` (the cross-attention norm), ...; diffusers names the same tensors
`attn1.to_q`, `attn2.add_k_proj`, `ffn.net.0.proj`, `scale_shift_table`, `norm2`, ... with the
same shapes, so a load is a rename. The table below is one substring rename per row, applied in
order (reversed for the other direction); the blocks' norm2 / norm3 swap goes through a
placeholder, before the image embedder's rows so it does not touch their norm1 / norm2. Our reference-adapter layers have no
diffusers counterpart: their keys pass through unchanged on read, and a model that has them is
refused on write (diffusers could not load it).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

DIFFUSERS_CLASS = "WanTransformer3DModel"

# (official substring, diffusers substring), in the order they apply official -> diffusers
_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    (".self_attn.", ".attn1."),
    (".cross_attn.", ".attn2."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".o.", ".to_out.0."),
    (".k_img.", ".add_k_proj."),
    (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    (".modulation", ".scale_shift_table"),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm2.", ".norm__swap."),
    (".norm3.", ".norm2."),
    (".norm__swap.", ".norm3."),
    # after the swap, which must not reach the image embedder's own norm1 / norm2
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
)


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def official_key(diffusers_key: str) -> str:
    """`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight` (unknown keys unchanged)."""
    # reversed order, each pair reversed; the placeholder rows undo the swap the same way
    return _rename(diffusers_key, [(new, old) for old, new in reversed(_RENAMES)])


def diffusers_key(official: str) -> str:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.attn1.to_q.weight`."""
    return _rename(official, _RENAMES)


def is_diffusers_layout(config: Mapping[str, Any] | None, keys) -> bool:
    """A diffusers transformer: its config says so, or (no config) its keys do."""
    if config and config.get("_class_name") == DIFFUSERS_CLASS:
        return True
    return config is None and any(k.startswith("condition_embedder.") for k in keys)


def to_official(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        name = official_key(k)
        if name in out:
            raise ValueError(f"{source}: keys {k!r} and another both map to {name!r}")
        out[name] = v
    return out


def to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {diffusers_key(k): v for k, v in sd.items()}


def official_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A `WanTransformer3DModel` config.json as WanConfig fields (text_len: Wan's 512; diffusers
    pads the text outside the model)."""
    try:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        image_dim = config.get("image_dim")
        out = dict(model_type="i2v" if image_dim else "t2v", patch_size=tuple(config["patch_size"]),
                   in_dim=int(config["in_channels"]), out_dim=int(config["out_channels"]), dim=heads * head_dim,
                   num_heads=heads, ffn_dim=int(config["ffn_dim"]), freq_dim=int(config["freq_dim"]),
                   text_dim=int(config["text_dim"]), num_layers=int(config["num_layers"]),
                   eps=float(config["eps"]), cross_attn_norm=bool(config["cross_attn_norm"]),
                   qk_norm=config.get("qk_norm") not in (None, False))
    except KeyError as exc:
        raise ValueError(f"{where}: a {DIFFUSERS_CLASS} config needs field {exc.args[0]!r}") from exc
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad value in a {DIFFUSERS_CLASS} config: {exc}") from exc
    if config.get("qk_norm") not in (None, False, "rms_norm_across_heads"):
        raise ValueError(f"{where}: field 'qk_norm' = {config['qk_norm']!r}: Wan uses 'rms_norm_across_heads'")
    if config.get("added_kv_proj_dim") not in (None, out["dim"]):
        raise ValueError(f"{where}: field 'added_kv_proj_dim' = {config['added_kv_proj_dim']} differs from "
                         f"dim {out['dim']}; not a Wan2.1 layout")
    if image_dim:
        out["clip_dim"] = int(image_dim)
    return out


def diffusers_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """WanConfig fields (`to_dict()`) as a `WanTransformer3DModel` config.json."""
    i2v = values["model_type"] == "i2v"
    return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.42.0",
            "patch_size": list(values["patch_size"]), "num_attention_heads": values["num_heads"],
            "attention_head_dim": values["dim"] // values["num_heads"], "in_channels": values["in_dim"],
            "out_channels": values["out_dim"], "text_dim": values["text_dim"], "freq_dim": values["freq_dim"],
            "ffn_dim": values["ffn_dim"], "num_layers": values["num_layers"],
            "cross_attn_norm": values["cross_attn_norm"],
            "qk_norm": "rms_norm_across_heads" if values["qk_norm"] else None, "eps": values["eps"],
            "image_dim": values["clip_dim"] if i2v else None, "added_kv_proj_dim": values["dim"] if i2v else None,
            "rope_max_seq_len": 1024}
