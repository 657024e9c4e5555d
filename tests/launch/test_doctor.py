"""`wanspeed doctor`: a real 2-rank smoke test over two --no-ssh "nodes" (node-b in another working
directory, so a relative cache dir is a node-local one), and its judgements on real node facts."""
import copy
import importlib.metadata
import re
from types import SimpleNamespace

import pytest

from ds_trainer.commands import main as wanspeed
from launch.checks import FAIL, OK, WARN, interface_matches, network_findings, version_findings
from launch.doctor import preflight
from launch.node_facts import collect
from launch.runner import LaunchPlan
from tests.launch.conftest import run_two_nodes, write_hostfile

ALLREDUCE = re.compile(r"\[  OK\] all-reduce: correct sum; 16 MiB float32 across 2 ranks \(gloo\): [\d.]+ ms median "
                       r"of 5, algbw ([\d.]+) GB/s, busbw ([\d.]+) GB/s")


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    (root / "node-b").mkdir()
    logdir = root / "shared_log"
    nodes = run_two_nodes("doctor", write_hostfile(root), ["--logdir", str(logdir), "--cache-dir", "local_cache"],
                          cwds=(root, root / "node-b"))
    return SimpleNamespace(nodes=nodes, logdir=logdir)


@pytest.mark.slow
def test_the_smoke_test_reports_every_check_and_an_allreduce_figure(doctor_run):
    (code0, out0), (code1, out1) = doctor_run.nodes
    lines = [ln for ln in out0.splitlines() if ln.startswith("[")]
    assert "[  OK] hostfile: " in lines[0] and "2 hosts, 2 ranks (node-a: 1, node-b: 1)" in lines[0], out0
    assert lines[1].startswith("[  OK] ssh: not used (--no-ssh)")
    deepspeed = importlib.metadata.version("deepspeed")
    assert any(ln.startswith("[  OK] versions: ") and f"deepspeed {deepspeed}" in ln and "on every rank" in ln
               for ln in lines), lines
    assert any(ln.startswith("[  OK] network: ") and "lo 127.0.0.1" in ln for ln in lines), lines
    figure = next(ALLREDUCE.search(ln) for ln in lines if ALLREDUCE.search(ln))
    assert float(figure.group(1)) > 0 and float(figure.group(2)) == pytest.approx(float(figure.group(1)), rel=0.02)
    assert "[  OK] shared filesystem: logdir: a file rank 0 wrote there is visible to every rank" in lines
    fails = [ln for ln in lines if ln.startswith("[FAIL]")]
    assert fails == ["[FAIL] shared filesystem: cache_dir local_cache is not shared by every node: rank 1 "
                     f"({collect()['host']}) cannot see the file rank 0 ({collect()['host']}) wrote there; multi-node "
                     "runs need the log dir and the cache on a filesystem every node sees"], lines
    assert code0 == 1  # a failed check
    assert code1 == 0 and "[  OK] smoke test: node 1's ranks passed; node 0 prints the report" in out1
    assert not list(doctor_run.logdir.glob(".wanspeed_shared_probe_*"))


def test_a_broken_hostfile_stops_the_doctor_with_its_line(tmp_path, capsys):
    hostfile = write_hostfile(tmp_path, "node-a slots=1\nnode-b slots=x\n")
    assert wanspeed(["doctor", "--hostfile", str(hostfile)]) == 1
    assert capsys.readouterr().out.strip() == (f"[FAIL] hostfile: {hostfile}:2: slots must be a positive integer, "
                                               f"got 'slots=x'")


def test_unreachable_hosts_are_named_one_line_each_and_no_smoke_test_runs(tmp_path, capsys):
    hostfile = write_hostfile(tmp_path, "node-x.invalid slots=1\nnode-y.invalid slots=1\n")
    findings, resources = preflight(LaunchPlan(hostfile))
    assert resources is None
    ssh = [f for f in findings if f.check == "ssh"]
    assert [f.level for f in ssh][:2] == [FAIL, FAIL]
    for finding, host in zip(ssh, ("node-x.invalid", "node-y.invalid")):
        assert finding.detail.startswith(f"host '{host}' is not reachable by passwordless ssh (")
        assert "--no-ssh" in finding.detail and "\n" not in finding.detail
    assert ssh[-1].detail.startswith("pdsh is not installed") or len(ssh) == 2  # this machine has no pdsh
    # one host: DeepSpeed's runner still ssh-checks it (no pdsh needed)
    (tmp_path / "one").mkdir()
    findings, resources = preflight(LaunchPlan(write_hostfile(tmp_path / "one", "node-x.invalid slots=1\n")))
    assert resources is None and [f.detail.split(" is not")[0] for f in findings if f.check == "ssh"] == \
        ["host 'node-x.invalid'"]
    # wanspeed launch refuses the same hostfile with the first host's line
    assert wanspeed(["launch", "--hostfile", str(hostfile), "--", "train", "--config", "c", "--logdir",
                     str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("wanspeed launch: error: host 'node-x.invalid' is not reachable")


@pytest.fixture
def facts():
    """This machine's real facts, as rank_check gathers them, for two ranks on two hosts."""
    a = collect()
    b = copy.deepcopy(a)
    a["host"], b["host"] = "node-a", "node-b"
    return [a, b]


def _levels(findings, level):
    return [f.detail for f in findings if f.level == level]


def test_versions_that_bite(facts):
    assert _levels(version_findings(facts), FAIL) == [] and _levels(version_findings(facts), WARN) == []
    facts[1]["versions"]["deepspeed"] = "0.19.4"
    found = version_findings(facts)
    assert any(d.startswith("deepspeed differs between nodes: rank 0 (node-a) has") and "node-b=0.19.4" in d
               for d in _levels(found, FAIL))
    assert _levels(found, WARN) == ["node-b: deepspeed 0.19.4 < 0.19.6: DeepCompile with frozen parameters needs "
                                    "0.19.6 (leave `compile` off)"]
    facts[1]["versions"]["deepspeed"] = "0.18.0"
    assert any("node-b: deepspeed 0.18.0 < 0.19.3: activation checkpointing with frozen parameters" in d
               for d in _levels(version_findings(facts), FAIL))
    facts[1].update(nvidia_device_files=True, cuda=None)
    assert "node-b: NVIDIA devices but a CPU-only torch build" in _levels(version_findings(facts), FAIL)


def test_nccl_and_gloo_interface_variables(facts):
    up = [n for n, i in facts[0]["interfaces"].items() if i["up"]]
    assert "lo" in up
    assert interface_matches("lo", up, nccl=True) == ["lo"] and interface_matches("^lo", up, nccl=True) == \
        [n for n in up if n != "lo"]
    assert interface_matches("=l", up, nccl=True) == [] and interface_matches("l", up, nccl=True) == ["lo"]
    assert interface_matches("lo,nope", up, nccl=False) == ["lo"]
    assert _levels(network_findings(facts, gpu_run=False), FAIL) == []
    facts[1]["env"] = {"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "lo"}
    fails = _levels(network_findings(facts, gpu_run=False), FAIL)
    assert fails == [f"node-b: NCCL_SOCKET_IFNAME=ib selects no interface that is up (up: {', '.join(up)})"]
    facts[0]["interfaces"]["docker0"] = {"up": True, "ipv4": ["172.17.0.1"]}
    facts[0]["infiniband"], facts[0]["env"] = ["mlx5_0"], {"NCCL_IB_DISABLE": "1"}
    warns = _levels(network_findings(facts, gpu_run=True), WARN)
    assert any(w.startswith("node-a: NCCL_SOCKET_IFNAME is not set and bridge interfaces are up (docker0)") for w in warns)
    assert "node-a: InfiniBand devices present but NCCL_IB_DISABLE=1 (NCCL falls back to TCP sockets)" in warns
    assert any(f.startswith("node-b: no InfiniBand devices") for f in _levels(network_findings(facts, True), OK))
