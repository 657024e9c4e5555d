"""`wanspeed doctor`'s judgements on the smoke test's report (launch/rank_check.py): versions that
bite, the same versions on every node, network interfaces and the NCCL / Gloo variables that pick
them, the all-reduce's figure, and shared directories. Pure functions of the report's JSON."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from packaging.version import InvalidVersion, Version

OK, WARN, FAIL = "ok", "warn", "fail"
REPORT_TAG = "WANSPEED_DOCTOR_REPORT"
"""Rank 0 of launch/rank_check.py prints `REPORT_TAG <json>`, the report judged here."""


@dataclass(frozen=True)
class Finding:
    level: str
    check: str
    detail: str

    def line(self) -> str:
        return f"[{self.level.upper():>4}] {self.check}: {self.detail}"


VERSION_RULES = (
    # package, minimum, level below it, what breaks
    ("torch", "2.6", FAIL, "setup.py's supported range starts there"),
    ("deepspeed", "0.19.3", FAIL, "activation checkpointing with frozen parameters breaks (DeepSpeed #8148)"),
    ("deepspeed", "0.19.6", WARN, "DeepCompile with frozen parameters needs 0.19.6 (leave `compile` off)"),
    ("triton", "3.3", WARN, "the Triton attention kernels need it (GPU nodes; sdpa still works)"),
)
CONSISTENT = ("python", "torch", "deepspeed", "triton", "cuda", "nccl")
"""Versions that must be equal on every rank: mixed builds fail in collectives, or worse, silently."""
BRIDGE_PREFIXES = ("docker", "virbr", "veth", "br-", "cni", "flannel", "cali")
"""Interfaces NCCL may pick by itself that do not reach other nodes (huggingface/accelerate#1317)."""


def _version(text: Optional[str]) -> Optional[Version]:
    try:
        return Version(text.split("+")[0]) if text else None
    except InvalidVersion:
        return None


def _installed(facts: dict[str, Any], key: str) -> Optional[str]:
    """A package version, or the node's CUDA / NCCL version."""
    return facts["versions"].get(key) if key in facts["versions"] else facts.get(key)


def version_findings(facts: list[dict[str, Any]]) -> list[Finding]:
    out = []
    first = facts[0]
    mixed = False
    for key in CONSISTENT:
        differ = sorted({f"{f['host']}={_installed(f, key)}" for f in facts if _installed(f, key) != _installed(first, key)})
        if differ:
            mixed = True
            out.append(Finding(FAIL, "versions", f"{key} differs between nodes: rank 0 ({first['host']}) has "
                                                 f"{_installed(first, key)}, {', '.join(differ)}"))
    for f in _one_per_host(facts):
        for package, minimum, level, why in VERSION_RULES:
            if package == "triton" and not f["gpus"]:
                continue
            have = _version(f["versions"].get(package))
            if have is None:
                out.append(Finding(level if package == "triton" else FAIL, "versions",
                                   f"{f['host']}: {package} is not installed" + (f"; {why}" if package == "triton" else "")))
            elif have < Version(minimum):
                out.append(Finding(level, "versions", f"{f['host']}: {package} {have} < {minimum}: {why}"))
        if f["nvidia_device_files"] and not f["cuda"]:
            out.append(Finding(FAIL, "versions", f"{f['host']}: NVIDIA devices but a CPU-only torch build"))
    v = first["versions"]
    out.append(Finding(OK, "versions", f"python {v['python']}, torch {v['torch']}, deepspeed {v['deepspeed']}, "
                                       f"triton {v['triton']}, CUDA {first['cuda']}, NCCL {first['nccl']}"
                                       f"{' on every rank' if len(facts) > 1 and not mixed else ' on rank 0'}"))
    return out


def interface_matches(spec: str, names: list[str], nccl: bool) -> list[str]:
    """The interfaces `spec` selects. NCCL_SOCKET_IFNAME: comma-separated prefixes, `=` for exact
    names, a leading `^` to exclude; GLOO_SOCKET_IFNAME: comma-separated exact names."""
    if not nccl:
        wanted = [s for s in spec.split(",") if s]
        return [n for n in names if n in wanted]
    exclude = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    items = [s for s in spec.lstrip("=").split(",") if s]
    hit = [n for n in names if any(n == s if exact else n.startswith(s) for s in items)]
    return [n for n in names if n not in hit] if exclude else hit


def network_findings(facts: list[dict[str, Any]], gpu_run: bool) -> list[Finding]:
    out = []
    for f in _one_per_host(facts):
        up = [n for n, i in f["interfaces"].items() if i["up"]]
        shown = ", ".join(f"{n} {'/'.join(f['interfaces'][n]['ipv4']) or '-'}" for n in up)
        env = f["env"]
        variables = " ".join(f"{k}={v}" for k, v in env.items()) or "no NCCL_* / GLOO_* variables set"
        out.append(Finding(OK, "network", f"{f['host']}: interfaces up: {shown or 'none'}; InfiniBand: "
                                          f"{', '.join(f['infiniband']) or 'none'}; {variables}"))
        for var, nccl in (("NCCL_SOCKET_IFNAME", True), ("GLOO_SOCKET_IFNAME", False)):
            if var in env and not interface_matches(env[var], up, nccl):
                out.append(Finding(FAIL, "network", f"{f['host']}: {var}={env[var]} selects no interface that is up "
                                                    f"(up: {', '.join(up) or 'none'})"))
        bridges = [n for n in up if n.startswith(BRIDGE_PREFIXES)]
        if gpu_run and len(facts) > 1 and "NCCL_SOCKET_IFNAME" not in env and bridges:
            out.append(Finding(WARN, "network", f"{f['host']}: NCCL_SOCKET_IFNAME is not set and bridge interfaces "
                                                f"are up ({', '.join(bridges)}): NCCL may pick one that does not reach "
                                                f"the other nodes; set NCCL_SOCKET_IFNAME to the cluster interface"))
        if f["infiniband"] and env.get("NCCL_IB_DISABLE") == "1":
            out.append(Finding(WARN, "network", f"{f['host']}: InfiniBand devices present but NCCL_IB_DISABLE=1 "
                                                f"(NCCL falls back to TCP sockets)"))
        if gpu_run and not f["infiniband"] and len({x["host"] for x in facts}) > 1:
            out.append(Finding(OK, "network", f"{f['host']}: no InfiniBand devices: NCCL between nodes uses TCP"))
    return out


def _one_per_host(facts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for f in facts:
        seen.setdefault(f["host"], f)
    return list(seen.values())


def allreduce_finding(report: dict[str, Any]) -> Finding:
    bench, n = report["allreduce"], report["world_size"]
    figure = (f"{bench['bytes'] / 2 ** 20:.0f} MiB float32 across {n} ranks ({report['backend']}): "
              f"{bench['median_s'] * 1e3:.2f} ms median of {bench['iters']}, algbw {bench['algbw_gbps']:.2f} GB/s, "
              f"busbw {bench['busbw_gbps']:.2f} GB/s")
    if bench["wrong_ranks"]:
        return Finding(FAIL, "all-reduce", f"wrong sum on ranks {bench['wrong_ranks']}; {figure}")
    return Finding(OK, "all-reduce", f"correct sum; {figure}")


def shared_findings(report: dict[str, Any]) -> list[Finding]:
    out = []
    for what, problem in report["shared"].items():
        if problem:
            out.append(Finding(FAIL, "shared filesystem", problem))
        else:
            out.append(Finding(OK, "shared filesystem", f"{what}: a file rank 0 wrote there is visible to every rank"))
    return out


def report_findings(report: dict[str, Any]) -> list[Finding]:
    facts = report["facts"]
    gpu_run = report["backend"] == "nccl"
    return (version_findings(facts) + network_findings(facts, gpu_run) + [allreduce_finding(report)]
            + shared_findings(report))
