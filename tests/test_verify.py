"""embedpipe verify: a sound folder passes; each injected corruption is reported and exits 1."""
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli



@pytest.fixture(scope="module")
def sound(tiny_index):
    return tiny_index


def run(*paths):
    r = CliRunner().invoke(cli, ["verify", "--json", *map(str, paths)])
    return r.exit_code, json.loads(r.output) if r.output.startswith("{") else r.output


def copy(sound, tmp_path):
    shutil.copytree(sound / "emb", tmp_path / "emb")
    return tmp_path / "emb", next((tmp_path / "emb" / "embeddings").glob("*.parquet"))


def test_sound_folders_verify_clean(sound):
    code, report = run(sound / "emb", sound / "idx")
    assert code == 0
    assert report[str(sound / "emb")]["problems"] == [] and report[str(sound / "emb")]["rows"] == 200
    assert report[str(sound / "idx")]["vectors"] == 200


@pytest.mark.parametrize("corruption,expected", [
    ("drop_rows", "rows but its done record says"),
    ("duplicate_key", "duplicate key"),
    ("nan", "NaN or Inf"),
    ("inf", "NaN or Inf"),
    ("other_dim", "dim 256, expected 512"),
    ("other_dtype", "dtype float32, run.json says float16"),
    ("missing_parquet", "done record but no"),
])
def test_corruptions_are_reported(sound, tmp_path, corruption, expected):
    emb, f = copy(sound, tmp_path)
    t = pq.read_table(f)
    if corruption == "drop_rows":
        t = t.slice(0, 10)
    elif corruption == "duplicate_key":
        keys = t.column("key").to_pylist()
        t = t.set_column(0, "key", pa.array([keys[0]] + keys[1:-1] + [keys[0]]))
    elif corruption in ("nan", "inf", "other_dtype", "other_dim"):
        e = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        if corruption == "nan":
            e[3, 5] = np.nan
        if corruption == "inf":
            e[7, 0] = -np.inf
        if corruption == "other_dim":
            e = np.ascontiguousarray(e[:, :256])
        typ = pa.float32() if corruption == "other_dtype" else pa.float16()
        col = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1).astype(typ.to_pandas_dtype())), e.shape[1])
        t = t.set_column(t.column_names.index("embedding"), "embedding", col)
    if corruption == "missing_parquet":
        f.unlink()
    else:
        pq.write_table(t, f)
    code, report = run(emb)
    assert code == 1
    assert any(expected in p for p in report[str(emb)]["problems"]), report


def test_parquet_without_record_is_pending_not_corrupt(sound, tmp_path):
    emb, f = copy(sound, tmp_path)
    (emb / "_state" / f"{f.stem}.json").unlink()
    (emb / "_SUCCESS").unlink()  # killed before its record: the run never got to mark the folder complete
    code, report = run(emb)  # not corrupt (no problem), but not done either: not OK
    assert code == 1 and report[str(emb)]["problems"] == [] and report[str(emb)]["pending_without_record"] == [f.stem]
    assert "(0 failed, 1 pending)" in report[str(emb)]["incomplete"]


def test_index_count_and_ids_mismatch(sound, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(sound / "idx", idx)
    meta = json.loads((idx / "index.json").read_text())
    meta["count"] += 1
    (idx / "index.json").write_text(json.dumps(meta))
    ids = pq.read_table(idx / "ids.parquet")
    keys = ids.column("key").to_pylist()
    pq.write_table(ids.set_column(ids.column_names.index("key"), "key", pa.array(["ghost"] + keys[1:])),
                   idx / "ids.parquet")
    code, report = run(idx)
    problems = report[str(idx)]["problems"]
    assert code == 1 and any("index.json says 201" in p for p in problems)
    assert any("name another item than the embedding row" in p and "'ghost'" in p for p in problems)


def test_not_a_folder_of_ours(tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert r.exit_code != 0 and "neither an embed output folder" in str(r.exception)


def test_failed_or_pending_shards_are_not_ok(sound, digits_shards, tmp_path):
    emb, _ = copy(sound, tmp_path)
    run_json = emb / "run.json"
    meta = json.loads(run_json.read_text())
    meta["config"]["shards"] = 3  # a third shard of the run never finished
    run_json.write_text(json.dumps(meta))
    (emb / "_SUCCESS").unlink()  # so the run never marked the folder complete
    r = CliRunner().invoke(cli, ["verify", str(emb)])
    assert r.exit_code == 1 and f"{emb}: sound but incomplete" in r.output
    assert "1 of 3 shard(s) not done (0 failed, 1 pending)" in r.output
    (emb / "_state" / "x.failed.json").write_text(json.dumps({"url": "data/x.tar", "reason": "OSError: gone"}))
    code, report = run(emb)
    assert code == 1 and report[str(emb)]["problems"] == [] and report[str(emb)]["failed"] == {"data/x.tar": "OSError: gone"}
    assert "(1 failed, 0 pending)" in report[str(emb)]["incomplete"]
    r = CliRunner().invoke(cli, ["verify", str(emb)])
    assert "  failed data/x.tar: OSError: gone" in r.output
