"""`wanspeed bench kernels`: the shape sets come from the bench modules' own tables, a set runs
on the benches that define it, and the rows go to JSON."""
import argparse
import importlib
import json
import sys
import types

import pytest

from ds_trainer.commands import bench, main
from kernels.bench import runner
from kernels.bench.harness import Row


def _parser():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser


def test_every_shape_set_of_every_bench_can_be_chosen():
    tables = {b: set(getattr(importlib.import_module(m), "SHAPES", {})) for b, m in runner.BENCHES.items()}
    named = set().union(*tables.values())
    assert "wan-1.3b-8k" in named  # qk_norm_rope's CPU-sized slice, which a hand-kept list had left out
    parser = _parser()
    for name in sorted(named):
        assert parser.parse_args(["kernels", "--shapes", name]).shapes == name
    with pytest.raises(SystemExit):
        parser.parse_args(["kernels", "--shapes", "wan-99b"])
    sets = runner.shape_sets()
    assert all(set(sets[b]) == t for b, t in tables.items() if t)
    # block_causal_attention has no table: its sets are those its shape builder accepts
    builder = importlib.import_module(runner.BENCHES["block_causal_attention"])._shapes
    assert sets["block_causal_attention"] and all(builder(n) for n in sets["block_causal_attention"])
    assert "wan-1.3b-8k" not in sets["block_causal_attention"]


def test_a_shape_set_runs_on_the_benches_that_define_it():
    assert runner.select("wan-1.3b-8k") == ["qk_norm_rope"]
    assert runner.select("tiny") == sorted(runner.BENCHES)
    assert runner.select("tiny", ["qk_norm_rope"]) == ["qk_norm_rope"]
    with pytest.raises(ValueError, match="define no shape set 'wan-1.3b-8k'"):
        runner.select("wan-1.3b-8k", ["fused_cross_attention"])
    with pytest.raises(ValueError, match=r"unknown bench\(es\) \['nope'\]"):
        runner.select("tiny", ["nope"])


def test_bench_kernels_runs_the_chosen_bench_and_writes_json(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("fake_bench")
    fake.SHAPES = {"tiny": [], "fake-only": []}

    def run(shapes, device):
        calls.append(shapes)
        return [Row(kernel="fake", mode="fwd", shape={"L": 1}, provider="p", ours=True, median_ms=1.0)]

    fake.run = run
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(runner.BENCHES, "fake", "fake_bench")
    out = tmp_path / "results.json"
    assert main(["bench", "kernels", "--shapes", "fake-only", "--out", str(out)]) == 0
    assert calls == ["fake-only"]  # the other benches define no such set: not run
    written = json.loads(out.read_text())
    assert written["shapes"] == "fake-only" and [r["kernel"] for r in written["rows"]] == ["fake"]
    assert f"results written to {out}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown bench"):
        main(["bench", "kernels", "--shapes", "tiny", "--only", "nope", "--out", str(out)])


def test_bench_kernels_needs_no_data_stack():
    """The GPU machine runs `python -m ds_trainer.commands bench kernels` with torch + triton only."""
    import subprocess
    from pathlib import Path
    code = ("import argparse, sys; from ds_trainer.commands import bench; p = argparse.ArgumentParser(); "
            "bench.add_arguments(p); p.parse_args(['kernels', '--shapes', 'tiny']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'data', 'model', 'decord', 'PIL', 'imageio'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("[]")
