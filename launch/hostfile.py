"""DeepSpeed hostfiles: read, check, and select the hosts and slots a launch uses.

A hostfile is DeepSpeed's MPI-style list, one host a line:

    # comment lines and blank lines are ignored
    node-a slots=8
    node-b slots=8    # a trailing comment is allowed

Every problem is one line that names the file and the line (`HostfileError`):

- the file does not exist / is not a file: `hostfile H does not exist` (DeepSpeed itself only
  warns and trains on the local machine);
- a line without slots: `H:3: 'node-a' has no slots=N (expected '<host> slots=<N>')`;
- slots that are not a positive integer: `H:2: slots must be a positive integer, got 'slots=0'`;
- anything after slots=N: `H:2: unexpected 'extra' after 'slots=4'`;
- a host name DeepSpeed's --include/--exclude syntax cannot name (`:`, `@`, `,`, `=`);
- the same host twice: `H:4: host 'node-a' is listed twice (first on line 1)`;
- no host at all: `H: no hosts (every line is blank or a comment)`.

`select_resources` applies --include / --exclude / --num_nodes / --num_gpus the way
`deepspeed.launcher.runner` does, with errors naming the host or slot that does not exist.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

SLOTS = re.compile(r"^slots=(\S*)$")
HOST_NAME_FORBIDDEN = ":@,="
"""Characters the --include/--exclude syntax (`host:0,1@other`) and `slots=` give a meaning."""


class HostfileError(ValueError):
    """A hostfile or a host/slot selection that cannot be launched; the message is one line."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int
    """1-based line of the hostfile it is on."""


def read_hostfile(path: str | Path) -> list[Host]:
    """The hosts of `path` in file order; `HostfileError` for any problem listed above."""
    path = Path(path)
    if not path.exists():
        raise HostfileError(f"hostfile {path} does not exist")
    if not path.is_file():
        raise HostfileError(f"hostfile {path} is not a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise HostfileError(f"hostfile {path} cannot be read: {err}") from None
    return parse_hostfile(text, str(path))


def parse_hostfile(text: str, name: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{name}:{number}"
        host = fields[0]
        if len(fields) == 1 or not SLOTS.match(fields[1]):
            if len(fields) == 1:
                raise HostfileError(f"{where}: {host!r} has no slots=N (expected '<host> slots=<N>')")
            raise HostfileError(f"{where}: expected 'slots=<N>' after {host!r}, got {fields[1]!r}")
        value = SLOTS.match(fields[1]).group(1)
        if not value.isdigit() or int(value) < 1:
            raise HostfileError(f"{where}: slots must be a positive integer, got {fields[1]!r}")
        if len(fields) > 2:
            raise HostfileError(f"{where}: unexpected {' '.join(fields[2:])!r} after {fields[1]!r}")
        bad = sorted(set(host) & set(HOST_NAME_FORBIDDEN))
        if bad:
            raise HostfileError(f"{where}: host name {host!r} contains {''.join(bad)!r}, which --include/--exclude "
                                f"cannot name")
        if host in first_line:
            raise HostfileError(f"{where}: host {host!r} is listed twice (first on line {first_line[host]})")
        first_line[host] = number
        hosts.append(Host(host, int(value), number))
    if not hosts:
        raise HostfileError(f"{name}: no hosts (every line is blank or a comment)")
    return hosts


def _parse_filter(spec: str, hosts: dict[str, int], flag: str) -> dict[str, list[int]]:
    """`host[:slot,slot][@host...]` -> host -> slots ([] = all), checked against the hostfile."""
    out: dict[str, list[int]] = {}
    for part in spec.split("@"):
        name, _, slot_text = part.partition(":")
        if name not in hosts:
            raise HostfileError(f"{flag} {spec!r}: host {name!r} is not in the hostfile (hosts: {', '.join(hosts)})")
        slots = []
        for item in filter(None, slot_text.split(",")):
            if not item.isdigit() or int(item) >= hosts[name]:
                raise HostfileError(f"{flag} {spec!r}: host {name!r} has slots 0..{hosts[name] - 1}, not {item!r}")
            slots.append(int(item))
        out.setdefault(name, [])
        out[name] = sorted(set(out[name]) | set(slots))
    return out


def select_resources(hosts: list[Host], include: str = "", exclude: str = "", num_nodes: int = -1,
                     num_gpus: int = -1) -> "OrderedDict[str, list[int]]":
    """host -> slot indices the launch uses, in hostfile order (ranks are numbered in this order)."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be combined")
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise HostfileError("--num-nodes / --num-gpus cannot be combined with --include / --exclude")
    slots = {h.name: h.slots for h in hosts}
    active = OrderedDict((h.name, list(range(h.slots))) for h in hosts)
    if include:
        chosen = _parse_filter(include, slots, "--include")
        active = OrderedDict((n, chosen[n] or s) for n, s in active.items() if n in chosen)
    elif exclude:
        dropped = _parse_filter(exclude, slots, "--exclude")
        active = OrderedDict((n, [i for i in s if dropped[n] and i not in dropped[n]] if n in dropped else s)
                             for n, s in active.items())
        active = OrderedDict((n, s) for n, s in active.items() if s)
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(f"--num-nodes {num_nodes}: the hostfile has only {len(active)} hosts")
        active = OrderedDict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        short = [n for n, s in active.items() if len(s) < num_gpus]
        if short:
            raise HostfileError(f"--num-gpus {num_gpus}: host {short[0]!r} has only {slots[short[0]]} slots")
        active = OrderedDict((n, list(range(num_gpus))) for n in active)
    if not active:
        raise HostfileError("no host left after --include / --exclude")
    return active
