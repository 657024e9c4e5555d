"""Load Wan DiT weights from every format they ship in, into a model built on the meta device.

Accepted sources (one entry point, `load_wan_model`):
- a Hugging Face directory: `config.json` + `diffusion_pytorch_model.safetensors`, or shards
  `diffusion_pytorch_model-0000k-of-0000n.safetensors` listed in `...safetensors.index.json`, in
  the official releases' key names or in diffusers' (`Wan2.1-*-Diffusers/transformer`, a
  `WanTransformer3DModel`; renamed by model/diffusers_layout.py);
- a single `.safetensors` file;
- a `.pt` / `.pth` file (always `weights_only=True`, memory-mapped when possible), either a plain
  state dict or a Self-Forcing / LongLive training dict `{"generator" | "generator_ema" | "model":
  {"model.<key>": ...}}`.

The model is built on the meta device and the tensors are assigned (`assign=True`), so host RAM
peaks at about one copy of the weights. Every key is checked first: an unknown or mis-shaped key,
or a missing base key, is an error that names it. Keys of the new reference-adapter layers may be
missing (they are then initialised fresh, value side zero), as the seed's `strict=False` load.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import diffusers_layout
from model.config import ConfigError, ReferencePathsConfig, WanConfig
from model.wan import (ADAPTER_BLOCK_MODULES, ADAPTER_MODEL_PREFIXES, T2V_CLIP_PATH_MODULES, WanModel,
                       init_module_seeded)

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
TRAINING_DICT_ENTRIES = ("generator", "model", "state_dict")  # generator_ema first when use_ema
WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "_fsdp_wrapped_module.")
OFFICIAL_CONFIG_KEYS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim",
                        "num_heads", "num_layers", "eps")
ROPE_HEAD_DIM = 128  # every released Wan2.1 model; used only to infer num_heads from shapes


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the key."""


@dataclass
class LoadReport:
    """What a load did. `initialised` lists adapter parameters that were absent and got fresh init."""

    source: str
    format: str
    loaded: int = 0
    initialised: list[str] = field(default_factory=list)
    dropped_prefix: Optional[str] = None
    entry: Optional[str] = None

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors from {self.source} ({self.format}"
                 + (f", entry '{self.entry}'" if self.entry else "") + ")"]
        if self.initialised:
            parts.append(f"{len(self.initialised)} adapter tensors initialised fresh")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | Path, use_ema: bool = False
                    ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]], LoadReport]:
    """Read raw tensors (CPU, memory-mapped where the format allows), the config.json if any,
    and a report saying which format and entry they came from."""
    path = Path(path)
    if path.is_dir():
        return _from_diffusers_names(*_read_diffusers_dir(path), where=path / CONFIG_NAME)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.suffix == ".safetensors":
        return _from_diffusers_names(_read_safetensors([path]), None, LoadReport(str(path), "safetensors"), where=path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raw = _torch_load(path)
        sd, entry = _unwrap_training_dict(raw, path, use_ema)
        return sd, None, LoadReport(str(path), "torch", entry=entry)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected a directory, .safetensors, .pt or .pth)")


def _from_diffusers_names(sd, config, report: LoadReport, where: Path):
    """Rename a diffusers-layout (WanTransformer3DModel) state dict and config to the official ones."""
    if not diffusers_layout.is_diffusers_layout(config, sd.keys()):
        return sd, config, report
    try:
        sd = diffusers_layout.to_official(sd, report.source)
        config = diffusers_layout.official_config(config, str(where)) if config else None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    report.format += f", {diffusers_layout.DIFFUSERS_CLASS} names"
    return sd, config, report


def _read_diffusers_dir(path: Path):
    config = None
    if (path / CONFIG_NAME).exists():
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path / CONFIG_NAME}: invalid JSON: {exc}") from exc
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        if "weight_map" not in index:
            raise CheckpointError(f"{path / INDEX_NAME}: missing field 'weight_map'")
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{path / INDEX_NAME}: shard(s) {missing} listed but not present in {path}")
        sd = _read_safetensors([path / s for s in shards])
        absent = sorted(set(index["weight_map"]) - set(sd))
        if absent:
            raise CheckpointError(f"{path / INDEX_NAME}: key {absent[0]!r} (and {len(absent) - 1} more) "
                                  "listed in weight_map but absent from the shards")
        return sd, config, LoadReport(str(path), f"diffusers ({len(shards)} shards)")
    if (path / WEIGHTS_NAME).exists():
        return _read_safetensors([path / WEIGHTS_NAME]), config, LoadReport(str(path), "diffusers")
    raise CheckpointError(f"{path}: directory has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    if key in sd:
                        raise CheckpointError(f"{f}: key {key!r} also appears in another shard")
                    sd[key] = fh.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{f}: unreadable safetensors file: {exc}") from exc
    return sd


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
            raise CheckpointError(f"{path}: cannot load: {exc}") from exc
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load with weights_only=True: {exc}") from exc


def _unwrap_training_dict(raw: Any, path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """Plain state dict, or the model entry of a Self-Forcing / LongLive training dict."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(raw).__name__}")
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return dict(raw), None
    entries = (("generator_ema",) if use_ema else ()) + TRAINING_DICT_ENTRIES
    for entry in entries:
        if isinstance(raw.get(entry), Mapping):
            return dict(raw[entry]), entry
    if use_ema:
        raise CheckpointError(f"{path}: use_ema was asked but there is no 'generator_ema' entry")
    lora = [k for k in raw if k.endswith("_lora")]
    hint = f" (it holds LoRA entries {lora}: load the base checkpoint, then the adapter)" if lora else ""
    raise CheckpointError(f"{path}: no model entry among {list(entries)}; top-level keys: "
                          f"{sorted(raw)[:8]}{hint}")


def strip_wrapper_prefix(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """Remove a prefix every key shares (`model.` of Self-Forcing, `module.` of DDP, ...)."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    return sd, None


# --------------------------------------------------------------------------------- validation
def is_adapter_key(key: str, cfg: WanConfig) -> bool:
    """True for parameters of the reference adapters (allowed to be absent from a base checkpoint)."""
    if key.startswith(ADAPTER_MODEL_PREFIXES):
        return True
    m = re.match(r"blocks\.\d+\.cross_attn\.([a-z_]+)\.", key)
    if not m:
        return False
    return m.group(1) in ADAPTER_BLOCK_MODULES or (
        cfg.model_type == "t2v" and m.group(1) in T2V_CLIP_PATH_MODULES)


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size],
                     cfg: WanConfig, source: str) -> list[str]:
    """Raise CheckpointError naming the first unknown / mis-shaped / missing base key.

    Returns the adapter keys that are missing (to be initialised fresh)."""
    unknown = sorted(set(sd) - set(expected))
    if unknown:
        raise CheckpointError(f"{source}: unexpected key {unknown[0]!r}"
                              + (f" (and {len(unknown) - 1} more: {unknown[1:4]})" if len(unknown) > 1 else "")
                              + " — not a parameter of this model config")
    for key, tensor in sd.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[key])}")
    missing = sorted(set(expected) - set(sd))
    base_missing = [k for k in missing if not is_adapter_key(k, cfg)]
    if base_missing:
        raise CheckpointError(f"{source}: missing key {base_missing[0]!r}"
                              + (f" (and {len(base_missing) - 1} more)" if len(base_missing) > 1 else ""))
    return missing


# --------------------------------------------------------------------------------- the loader
def infer_config(sd: Mapping[str, torch.Tensor], source: str) -> WanConfig:
    """Architecture from tensor shapes, for checkpoints without config.json (head dim 128)."""
    try:
        pe = sd["patch_embedding.weight"]  # [dim, in_dim, pt, ph, pw]
        dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        data: dict[str, Any] = dict(
            model_type="i2v" if "img_emb.proj.0.weight" in sd else "t2v", patch_size=patch, in_dim=in_dim,
            dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], freq_dim=sd["time_embedding.0.weight"].shape[1],
            text_dim=sd["text_embedding.0.weight"].shape[1], num_layers=len(blocks),
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
            qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd)
    except KeyError as exc:
        raise CheckpointError(f"{source}: cannot infer the architecture, key {exc.args[0]!r} is missing; "
                              "pass an explicit model config") from exc
    if dim % ROPE_HEAD_DIM:
        raise CheckpointError(f"{source}: dim {dim} is not a multiple of head dim {ROPE_HEAD_DIM}; "
                              "pass an explicit model config (num_heads cannot be read from shapes)")
    data["num_heads"] = dim // ROPE_HEAD_DIM
    if "img_emb.proj.0.weight" in sd:
        data["clip_dim"] = sd["img_emb.proj.0.weight"].shape[0]
    data["reference_paths"] = ReferencePathsConfig(
        clip="clip_proj.weight" in sd, vae="vae_proj.weight" in sd,
        fused="blocks.0.cross_attn.k_fused.weight" in sd)
    return WanConfig(**data)


def load_wan_model(path: str | Path, config: Optional[WanConfig] = None,
                   reference_paths: Optional[ReferencePathsConfig] = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", use_ema: bool = False,
                   causal=None) -> tuple[WanModel, LoadReport]:
    """Build a WanModel on the meta device and load `path` into it (see the module docstring).

    config: the architecture; default = the directory's config.json, else inferred from shapes.
    reference_paths: adapters to add on top of that config (their weights may be absent).
    causal: a model.causal.CausalConfig to build the block-causal CausalWanModel instead (same keys).
    """
    sd, config_json, report = read_checkpoint(path, use_ema)
    sd, report.dropped_prefix = strip_wrapper_prefix(sd)
    if config is None:
        try:
            config = (WanConfig.from_dict(config_json, where=f"{path}/{CONFIG_NAME}") if config_json
                      else infer_config(sd, str(path)))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from exc
    if reference_paths is not None:
        config = config.replace(reference_paths=reference_paths)
    with torch.device("meta"):
        if causal is not None:
            from model.causal import CausalWanModel  # noqa: PLC0415  (model.causal builds on this module's WanModel)
            model = CausalWanModel(config, causal)
        else:
            model = WanModel(config)
    report.initialised = load_state_dict_assign(model, sd, str(path), dtype=dtype, device=device)
    report.loaded = len(sd)
    log.info("loaded %s", report.summary())
    return model, report


def load_state_dict_assign(model: WanModel, sd: Mapping[str, torch.Tensor], source: str,
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[str]:
    """Check, cast and assign `sd` into `model` (meta or materialised); initialise absent adapters."""
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    missing = check_state_dict(sd, expected, model.config, source)
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(cast, strict=False, assign=True)
    _materialise(model, missing, dtype, device)
    return missing


def _materialise(model: WanModel, missing: list[str], dtype, device) -> None:
    """Give absent (meta) adapter parameters real storage and their fresh initialisation, seeded
    per module from torch's current seed (identical on every rank and every ZeRO stage)."""
    owners = {k.rsplit(".", 1)[0] for k in missing}
    modules = dict(model.named_modules())
    seed = torch.initial_seed()
    for name in sorted(owners):
        mod = modules[name]
        mod.to_empty(device=device, recurse=False)
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(dtype)
        init_module_seeded(name, mod, model.config, seed)


# ----------------------------------------------------------------------------------- writing
def save_diffusers_dir(model: nn.Module | Mapping[str, torch.Tensor], config: WanConfig, out_dir: str | Path,
                       max_shard_bytes: Optional[int] = None, layout: str = "official") -> Path:
    """Write `config.json` + safetensors (sharded with an index when over `max_shard_bytes`),
    in the layout of the official Hugging Face releases, or (`layout="diffusers"`) as diffusers'
    `WanTransformer3DModel` (`WanTransformer3DModel.from_pretrained(out_dir)` loads it)."""
    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    values, defaults = config.to_dict(), WanConfig().to_dict()
    if layout == "diffusers":
        adapters = sorted(k for k in sd if is_adapter_key(k, config))
        if adapters or config.text_len != defaults["text_len"]:
            raise ValueError(f"diffusers' {diffusers_layout.DIFFUSERS_CLASS} has no reference-adapter layers "
                             f"({adapters[:3]}...) nor a text_len other than {defaults['text_len']}: "
                             "export the official layout, or merge/drop the adapters first")
        sd = diffusers_layout.to_diffusers(sd)
        cfg = diffusers_layout.diffusers_config(values)
    else:
        cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0"}
        cfg.update({k: values[k] for k in OFFICIAL_CONFIG_KEYS})
        # Fields the official config.json omits are written only when they differ from the default,
        # so a real-size export looks exactly like the released one.
        cfg.update({k: v for k, v in values.items() if k not in OFFICIAL_CONFIG_KEYS and v != defaults[k]})
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
    if max_shard_bytes is None:
        save_file(sd, str(out / WEIGHTS_NAME))
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
