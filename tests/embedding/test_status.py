"""`embedpipe status` (and `verify`'s incomplete verdict) on real folders: counts never exceed their totals."""
import json
import shutil

from click.testing import CliRunner

from pipeline.cli import cli
import tiny


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_folder_fed_two_input_sets_counts_both(digits_shards, tmp_path):
    out = tmp_path / "emb"
    assert _cli("embed", digits_shards[0], "--out", out, *tiny.cli_args()).exit_code == 0  # set A: 1 shard
    assert _cli("embed", *digits_shards[1:], "--out", out, *tiny.cli_args()).exit_code == 0  # set B: 2 more
    r = _cli("status", out, "--json")
    st = json.loads(r.output)
    assert r.exit_code == 0, r.output
    assert (st["done"], st["shards_expected"], st["failed"], st["pending"]) == (3, 3, 0, 0)
    assert st["shards_last_run"] == 2 and st["more_than_one_input_set"]
    line = _cli("status", out).output
    assert f"{out}: 3/3 shards done, 0 failed, 0 pending" in line
    assert "more than one run" in line and "its last run had 2" in line
    r = _cli("verify", out)
    assert r.exit_code == 0 and "incomplete" not in r.output


def test_a_failed_shard_is_counted_once(digits_shards, tmp_path):
    a, b, c = (tmp_path / f"{n}.tar" for n in "abc")
    shutil.copy(digits_shards[0], a)
    shutil.copy(digits_shards[1], b)
    c.write_bytes(digits_shards[2].read_bytes()[:5000])  # a truncated tar: the shard fails
    out = tmp_path / "emb"
    # rank 0 of 2 takes a and c (sorted[0::2]); b is rank 1's, still pending
    r = _cli("embed", a, b, c, "--out", out, "--rank", 0, "--world-size", 2, *tiny.cli_args())
    assert r.exit_code == 1, r.output
    r = _cli("status", out, "--json")
    st = json.loads(r.output)
    assert r.exit_code == 1
    assert (st["done"], st["shards_expected"], st["failed"], st["pending"]) == (1, 3, 1, 1)
    assert not st["more_than_one_input_set"] and list(st["failed_shards"]) == [str(c)]
    assert f"{out}: 1/3 shards done, 1 failed, 1 pending" in _cli("status", out).output
    r = _cli("verify", out)
    assert r.exit_code == 1 and "incomplete: 2 of 3 shard(s) not done (1 failed, 1 pending)" in r.output
