"""The official Wan2.1 DiT state-dict layout, written from upstream.md §1.1 independently of
model/wan.py, so tests compare our module tree against the documented one."""
import math


def official_wan_keys(model_type, dim, ffn_dim, num_heads, num_layers, in_dim=16, out_dim=16,
                      text_dim=4096, freq_dim=256, patch=(1, 2, 2), clip_dim=1280):
    """key -> shape for an official Wan2.1 checkpoint (qk_norm and cross_attn_norm on)."""
    keys = {
        "patch_embedding.weight": (dim, in_dim, *patch), "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, freq_dim), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (math.prod(patch) * out_dim, dim), "head.head.bias": (math.prod(patch) * out_dim,),
        "head.modulation": (1, 2, dim),
    }
    cross = ["q", "k", "v", "o"] + (["k_img", "v_img"] if model_type == "i2v" else [])
    for n in range(num_layers):
        b = f"blocks.{n}."
        for attn, linears in (("self_attn", ["q", "k", "v", "o"]), ("cross_attn", cross)):
            for lin in linears:
                keys[f"{b}{attn}.{lin}.weight"] = (dim, dim)
                keys[f"{b}{attn}.{lin}.bias"] = (dim,)
            keys[f"{b}{attn}.norm_q.weight"] = (dim,)
            keys[f"{b}{attn}.norm_k.weight"] = (dim,)
        if model_type == "i2v":
            keys[f"{b}cross_attn.norm_k_img.weight"] = (dim,)
        keys[f"{b}norm3.weight"] = (dim,)
        keys[f"{b}norm3.bias"] = (dim,)
        keys[f"{b}ffn.0.weight"] = (ffn_dim, dim)
        keys[f"{b}ffn.0.bias"] = (ffn_dim,)
        keys[f"{b}ffn.2.weight"] = (dim, ffn_dim)
        keys[f"{b}ffn.2.bias"] = (dim,)
        keys[f"{b}modulation"] = (1, 6, dim)
    if model_type == "i2v":
        keys.update({
            "img_emb.proj.0.weight": (clip_dim,), "img_emb.proj.0.bias": (clip_dim,),
            "img_emb.proj.1.weight": (clip_dim, clip_dim), "img_emb.proj.1.bias": (clip_dim,),
            "img_emb.proj.3.weight": (dim, clip_dim), "img_emb.proj.3.bias": (dim,),
            "img_emb.proj.4.weight": (dim,), "img_emb.proj.4.bias": (dim,),
        })
    return keys
