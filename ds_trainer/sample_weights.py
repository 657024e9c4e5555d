"""The generator `wanspeed sample` runs: the base weights once, then the trained weights on top.

`--ckpt` may be a checkpoint directory (`checkpoint_opens2v_*/`, `checkpoint_model_*/`: its
`model.pt`), a `model.pt` ({"generator" | "generator_ema": weights}, Self-Forcing's `model.`
prefix allowed), a LoRA checkpoint {"generator_lora": peft weights} (a LoRA DMD run's `model.pt`,
or LongLive's `lora.pt`, whose keys carry peft's `base_model.model.` prefix; the base then comes
from the config's generator_ckpt, e.g. `longlive_base.pt`), an `adapter.safetensors`, or a peft
LoRA directory (`lora/`: adapter_config.json + adapter_model.safetensors; the other adapters then
come from the `adapter.safetensors` beside it).
When the checkpoint directory has a `meta.json`, the weights' side of its compatibility key
(job, architecture, LoRA) must equal the sampling config's, or the load is refused naming each
field that differs; without one, a key or shape the model lacks is refused by name. Everything
is read with `weights_only` loads or safetensors: nothing in a checkpoint runs code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ds_trainer.config import RunConfig, architecture_key
from model.wan import WanModel, init_module_seeded

log = logging.getLogger(__name__)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MAX_META_BYTES = 1 << 24  # a meta.json is a few KiB; refuse to parse a huge one


class IncompatibleWeights(ValueError):
    """The trained weights do not fit the model the sampling config builds (says what differs)."""


@dataclasses.dataclass
class TrainedWeights:
    """The weights `--ckpt` holds: `weights` (state-dict keys of the model), optional `lora`
    (peft keys without the base_model.model. prefix), the checkpoint's compatibility key if it has
    a meta.json, and where they came from."""

    weights: dict[str, torch.Tensor]
    lora: Optional[dict[str, torch.Tensor]]
    compat: Optional[dict[str, Any]]
    source: str


def weights_key(cfg: RunConfig) -> dict[str, Any]:
    """The fields of a checkpoint's compatibility key that decide which weights it holds: the job,
    the generator architecture and the LoRA section (the frame count or size may change at sampling)."""
    adapter = dataclasses.asdict(cfg.adapter) if getattr(cfg, "adapter", None) else None
    if cfg.job == "dmd":
        return {"job": cfg.job, "generator": architecture_key(cfg.generator.architecture()), "adapter": adapter}
    return {"job": cfg.job, "model": architecture_key(cfg.wan_config()), "adapter": adapter}


def causal_of(cfg):
    """The CausalConfig of an adapter config with `model.causal`, else None."""
    section = getattr(getattr(cfg, "model", None), "causal", None)
    return section.causal_config() if section is not None else None


def base_generator(cfg, wan_cfg, dtype: torch.dtype = torch.float32, device="cpu") -> WanModel:
    """The config's base weights (`generator_ckpt`), or, without one, the random base the trainer
    builds (every module seeded from (seed, its name), so the same weights as in training). A config
    whose `model.causal` is set gets the block-causal CausalWanModel, as its run trained."""
    from model.causal import CausalWanModel  # noqa: PLC0415
    from model.checkpoint import load_wan_model  # noqa: PLC0415
    causal = causal_of(cfg)
    if cfg.generator_ckpt:
        return load_wan_model(cfg.generator_ckpt, config=wan_cfg, dtype=dtype, device=device, causal=causal)[0]
    model = CausalWanModel(wan_cfg, causal) if causal is not None else WanModel(wan_cfg)
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            init_module_seeded(name, module, wan_cfg, cfg.seed)
    return model.to(device=device, dtype=dtype)


def read_trained(path: Path, prefer_ema: bool = True) -> TrainedWeights:
    """What `--ckpt PATH` holds (module docstring); a path that is none of those is an error
    saying what was expected."""
    from safetensors.torch import load_file  # noqa: PLC0415

    from model.checkpoint import strip_wrapper_prefix  # noqa: PLC0415
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt: no such file or directory: {path}")
    lora = None
    if path.is_dir() and (path / PEFT_CONFIG).is_file():
        lora = {k.removeprefix("base_model.model."): v for k, v in load_file(str(path / PEFT_WEIGHTS)).items()}
        sibling = path.parent / "adapter.safetensors"
        weights = load_file(str(sibling)) if sibling.is_file() else {}
        if not weights:
            log.warning("%s: LoRA only (no adapter.safetensors beside it): the reference paths keep their "
                        "untrained values", path)
        return TrainedWeights(weights, lora, _compat(path.parent), str(path))
    if path.is_dir():
        for name in ("model.pt", "adapter.safetensors"):
            if (path / name).is_file():
                return read_trained(path / name, prefer_ema)
        raise FileNotFoundError(f"--ckpt {path}: a directory without model.pt, adapter.safetensors or a peft "
                                f"{PEFT_CONFIG}")
    if path.suffix == ".safetensors":
        weights = load_file(str(path))
    elif path.suffix in (".pt", ".pth"):
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if isinstance(raw, dict) and isinstance(raw.get("generator_lora"), dict):
            return TrainedWeights({}, lora_weights(raw["generator_lora"], path), _compat(path.parent), str(path))
        weights = _unwrap(raw, path, prefer_ema)
    else:
        raise ValueError(f"--ckpt {path}: expected a checkpoint directory, model.pt, adapter.safetensors or a "
                         f"peft LoRA directory")
    weights, _ = strip_wrapper_prefix(weights)
    return TrainedWeights(weights, lora, _compat(path.parent), str(path))


def _unwrap(raw: Any, path: Path, prefer_ema: bool) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of weights, got {type(raw).__name__}")
    order = ("generator_ema", "generator") if prefer_ema else ("generator", "generator_ema")
    for key in order:
        if isinstance(raw.get(key), dict):
            return raw[key]
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw
    raise ValueError(f"{path}: no 'generator' / 'generator_ema' weights (keys: {sorted(raw)[:6]})")


def lora_weights(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """peft LoRA tensors keyed by the model's module names (`blocks.0.self_attn.q.lora_A.weight`):
    wrapper prefixes (peft's `base_model.model.`, Self-Forcing's `model.`) and the adapter name
    (`.default`) dropped, so our DMD runs' `generator_lora` and LongLive's `lora.pt` read alike."""
    out = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor) or ".lora_" not in key:
            raise ValueError(f"{path}: generator_lora entry {key!r} is not a LoRA tensor")
        name = key
        for prefix in ("base_model.model.", "model."):
            name = name.removeprefix(prefix)
        out[name.replace(".default.", ".")] = value
    return out


def lora_targets(lora: dict[str, torch.Tensor], source: str) -> tuple[list[str], int]:
    """(module names, rank) a LoRA state dict was trained on; ranks must agree."""
    ranks = {k.rsplit(".lora_A.", 1)[0]: v.shape[0] for k, v in lora.items() if ".lora_A." in k}
    if not ranks or len(set(ranks.values())) != 1:
        raise IncompatibleWeights(f"{source}: LoRA weights with ranks {sorted(set(ranks.values()))} "
                                  "(expected one rank over every target)")
    return sorted(ranks), next(iter(ranks.values()))


def _compat(directory: Path) -> Optional[dict[str, Any]]:
    """The compatibility key of the checkpoint directory's meta.json, if it has one."""
    meta = directory / "meta.json"
    if not meta.is_file():
        return None
    if meta.stat().st_size > MAX_META_BYTES:
        raise ValueError(f"{meta}: {meta.stat().st_size} bytes, too large for a checkpoint's meta.json")
    data = json.loads(meta.read_text())
    compat = data.get("compat") if isinstance(data, dict) else None
    if not isinstance(compat, dict):
        raise ValueError(f"{meta}: no 'compat' object (not written by wanspeed?)")
    return compat


def check_compatible(trained: TrainedWeights, cfg: RunConfig, config_path: str) -> None:
    """Refuse weights whose checkpoint was trained with another job, architecture or LoRA than
    the sampling config's, naming every field that differs."""
    if trained.compat is None:
        return
    from ds_trainer.checkpointing import describe_difference  # noqa: PLC0415
    ours = json.loads(json.dumps(weights_key(cfg), default=str))
    theirs = json.loads(json.dumps({k: trained.compat.get(k) for k in ours}, default=str))
    diffs = describe_difference(theirs, ours)
    if diffs:
        raise IncompatibleWeights(f"{trained.source} was trained with another model config than {config_path}: "
                                  + "; ".join(diffs))


def load_into(model: torch.nn.Module, trained: TrainedWeights, assign: bool = False) -> torch.nn.Module:
    """Load the trained weights over the base (`strict=False`: base keys may be absent); a key the
    model lacks or a tensor of another shape is refused by name. `assign`: take the tensors as
    they are (a model built on the meta device). Returns the model."""
    expected = model.state_dict()
    extra = sorted(set(trained.weights) - set(expected))
    wrong = [f"{k}: {tuple(v.shape)} vs the model's {tuple(expected[k].shape)}"
             for k, v in trained.weights.items() if k in expected and v.shape != expected[k].shape]
    if extra or wrong:
        what = (f"keys the model lacks: {extra[:5]}" + (f" (and {len(extra) - 5} more)" if len(extra) > 5 else "")
                if extra else f"tensors of other shapes: {wrong[:5]}")
        raise IncompatibleWeights(f"{trained.source} does not fit the model of this config: {what}")
    model.load_state_dict(trained.weights, strict=False, assign=assign)
    if trained.lora:
        from peft import set_peft_model_state_dict  # noqa: PLC0415
        result = set_peft_model_state_dict(model, trained.lora)
        if getattr(result, "unexpected_keys", None):
            raise IncompatibleWeights(f"{trained.source}: LoRA keys the model lacks: {result.unexpected_keys[:5]}")
    return model


def merge_lora_and_unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA update into its base Linear and put the plain Linear back in its place (a
    model with no peft layers left, as a base checkpoint builds it)."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every LoRA update into its base Linear (peft's `merge`); returns how many were merged."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        layer.merge()
    return len(layers)
