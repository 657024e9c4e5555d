"""`wanspeed bench causal-block` (model/causal_bench.py) on the tiny shapes: both backends run the
same rollout (window + sink, the ring wraps) and agree; timings are per block; bad input is named."""
import json

import pytest

from model.causal_bench import bench_causal_block, format_rows, write_results


@pytest.fixture(scope="module")
def rows():
    return bench_causal_block("tiny", repeats=1, warmup=0)


def test_both_backends_time_every_block_and_agree(rows):
    sdpa, triton = rows
    assert (sdpa.provider, sdpa.ours, triton.provider, triton.ours) == ("sdpa", False, "triton", True)
    for r in rows:
        assert r.error is None and len(r.extra["per_block_ms"]) == r.shape["blocks"] == 3
        assert r.median_ms == pytest.approx(sum(r.extra["per_block_ms"]) / 3, rel=1e-3)
    assert sdpa.speedup_vs_best_stock == 1.0 and triton.speedup_vs_best_stock == pytest.approx(
        sdpa.median_ms / triton.median_ms)
    # the Triton KV-cache kernel computed what SDPA over the cache did (fp32 on CPU)
    assert sdpa.extra["max_abs_diff_vs_first"] == 0.0 and sdpa.extra["output_max_abs"] > 0
    assert triton.extra["max_abs_diff_vs_first"] < 1e-5 * sdpa.extra["output_max_abs"] + 1e-6


def test_results_are_written_as_json_and_a_table(rows, tmp_path):
    out = write_results(rows, "tiny", tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert data["shapes"] == "causal-block-tiny" and [r["provider"] for r in data["rows"]] == ["sdpa", "triton"]
    assert "ms/block" in format_rows(rows) and "triton" in format_rows(rows)


def test_a_backend_that_cannot_run_is_a_row_with_its_error_and_bad_shapes_are_named():
    rows = bench_causal_block("tiny", backends=("sdpa", "no-such-backend"), repeats=1, warmup=0)
    assert rows[0].error is None and rows[1].median_ms is None and "no-such-backend" in rows[1].error
    with pytest.raises(ValueError, match="num_frame_per_block"):
        bench_causal_block("tiny", overrides={"frames": 7}, repeats=1, warmup=0)
    with pytest.raises(ValueError, match="unknown shape set"):
        bench_causal_block("huge")
