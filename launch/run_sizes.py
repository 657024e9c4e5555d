"""The sizes a training command is configured with, as one line for messages about memory.

Read from the run YAML and the command's own overrides (`--zero`, `--set key=value`) without
importing the trainer (launch/ starts processes; it never imports ds_trainer). Both jobs'
sizes are covered: the adapter job's `model`, the DMD job's `generator` / `real_score` /
`fake_score` presets.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

SIZE_KEYS = ("batch_size", "gradient_accumulation_steps", "num_training_frames", "height", "width", "zero",
             "model.preset", "model.activation_checkpointing", "generator.preset", "real_score.preset",
             "fake_score.preset", "generator.activation_checkpointing", "cache_dir", "deepspeed_config")
ALIASES = {"pixel_height": "height", "pixel_width": "width"}  # the OpenS2V seed's names
FLAG_KEYS = {"--zero": "zero", "--deepspeed-config": "deepspeed_config"}


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _option(args: list[str], flag: str) -> list[str]:
    """Every value of `flag` in `args` (`--flag V` or `--flag=V`)."""
    out = []
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif arg.startswith(flag + "="):
            out.append(arg[len(flag) + 1:])
    return out


def configured_sizes(command_args: list[str]) -> dict[str, Any]:
    """{key: value} of SIZE_KEYS for a `train --config C ...` command line (only keys that are set);
    {} when the config cannot be read (the message then goes without sizes)."""
    configs = _option(command_args, "--config") or _option(command_args, "--config_path")
    tree: dict = {}
    if configs:
        try:
            tree = yaml.safe_load(Path(configs[-1]).read_text()) or {}
        except (OSError, yaml.YAMLError):
            tree = {}
    if not isinstance(tree, dict):
        tree = {}
    tree = {ALIASES.get(k, k): v for k, v in tree.items()}
    sizes = {key: _lookup(tree, key) for key in SIZE_KEYS}
    for item in _option(command_args, "--set"):
        key, sep, value = item.partition("=")
        key = ALIASES.get(key, key)
        if sep and key in sizes:
            try:
                sizes[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                sizes[key] = value
    for flag, key in FLAG_KEYS.items():
        given = _option(command_args, flag)
        if given:
            sizes[key] = given[-1]
    return {k: v for k, v in sizes.items() if v is not None}


def describe_sizes(sizes: dict[str, Any], host_memory_gib: Optional[float] = None) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sizes.items()) if sizes else "sizes unknown (config not readable)"
    if host_memory_gib is not None:
        text += f"; this node has {host_memory_gib:.0f} GiB of RAM"
    return text
