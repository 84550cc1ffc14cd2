"""The demo end to end on real digits with the real pretrained default backbone."""
import json

import pytest
from click.testing import CliRunner

from pipeline.cli import cli


@pytest.mark.slow
def test_demo_on_real_digits_is_far_above_chance(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "demo"), "--limit", "400"])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["images"] == 400
    assert result["precision_at_10"] > 0.5  # chance is 0.1
    assert result["probe_top1"] > 0.8
    assert min(result["knn_top1"].values()) > 0.6
    assert "precision@10" in r.output and "top-1" in r.output
    for path in ("emb/_SUCCESS", "index/index.json", "probe/head.pt", "probe/metrics.json"):
        assert (tmp_path / "demo" / path).exists(), path
