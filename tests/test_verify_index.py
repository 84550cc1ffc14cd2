"""verify catches index corruption: changed bytes, swapped ids, truncation, stray copies, edited records, stale _SUCCESS."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import UserError
from pipeline.index.build import run_index
from pipeline.index.options import IndexConfig


def verify(*paths):
    r = CliRunner().invoke(cli, ["verify", "--json", *map(str, paths)])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.exit_code, json.loads(r.output)[str(paths[0])]


@pytest.fixture
def idx(tiny_index, tmp_path):
    shutil.copytree(tiny_index / "idx", tmp_path / "idx")
    return tmp_path / "idx"


@pytest.fixture
def emb(tiny_index, tmp_path):
    shutil.copytree(tiny_index / "emb", tmp_path / "emb")
    return tmp_path / "emb"


def test_a_sound_index_records_its_files_checksums_and_verifies_clean(idx):
    files = json.loads((idx / "index.json").read_text())["files"]
    assert set(files) == {"index.faiss", "ids.parquet"} and all(len(f["sha256"]) == 64 for f in files.values())
    assert verify(idx)[0] == 0


@pytest.mark.parametrize("change", ["64 bytes", "1 bit"])
def test_changed_bytes_in_the_faiss_file_are_found(idx, change):
    data = bytearray((idx / "index.faiss").read_bytes())
    at = len(data) // 2
    if change == "1 bit":
        data[at] ^= 0x10
    else:
        data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    (idx / "index.faiss").write_bytes(bytes(data))
    code, report = verify(idx)
    assert code == 1 and any("index.faiss: its content changed" in p for p in report["problems"]), report


def test_two_swapped_keys_in_the_id_table_are_found(idx):
    ids = pq.read_table(idx / "ids.parquet")
    keys = ids.column("key").to_pylist()
    keys[3], keys[150] = keys[150], keys[3]
    pq.write_table(ids.set_column(ids.column_names.index("key"), "key", pa.array(keys)), idx / "ids.parquet")
    meta = json.loads((idx / "index.json").read_text())
    del meta["files"]  # as an index built before checksums were recorded: the rows themselves are checked
    (idx / "index.json").write_text(json.dumps(meta))
    code, report = verify(idx)
    assert code == 1 and any("2 id(s) name another item" in p for p in report["problems"]), report
    assert any("records no checksums" in f for f in report["findings"])


@pytest.mark.parametrize("recorded", [True, False])
def test_a_truncated_faiss_file_is_a_problem_not_a_traceback(idx, recorded):
    (idx / "index.faiss").write_bytes((idx / "index.faiss").read_bytes()[:1000])
    if not recorded:
        meta = json.loads((idx / "index.json").read_text())
        del meta["files"]
        (idx / "index.json").write_text(json.dumps(meta))
    code, report = verify(idx)
    assert code == 1 and any("index.faiss: FAISS cannot read it" in p for p in report["problems"]), report


def test_a_stray_copy_of_a_shards_file_is_a_problem(emb):
    f = sorted((emb / "embeddings").glob("*.parquet"))[0]
    shutil.copy(f, emb / "embeddings" / "copy-of-it.parquet")
    code, report = verify(emb)
    assert code == 1 and any("copy-of-it.parquet: no done record vouches for it" in p and "stray copy" in p
                             for p in report["problems"]), report
    r = CliRunner().invoke(cli, ["verify", str(emb)])
    assert "note: copy-of-it.parquet has no done record" in r.output


def test_an_edited_run_json_model_is_a_problem(emb):
    run = json.loads((emb / "run.json").read_text())
    run["fingerprint"]["model"] = "timm:resnet50"
    (emb / "run.json").write_text(json.dumps(run))
    code, report = verify(emb)
    assert code == 1 and any("its model is 'torchvision:resnet18', run.json records 'timm:resnet50'" in p
                             for p in report["problems"]), report


def test_a_stale_success_marker_is_refused_by_index_and_reported_by_verify(emb, tmp_path):
    assert (emb / "_SUCCESS").is_file()
    name = sorted((emb / "embeddings").glob("*.parquet"))[0].stem
    (emb / "embeddings" / f"{name}.parquet").unlink()  # file and done record deleted together
    (emb / "_state" / f"{name}.json").unlink()
    with pytest.raises(UserError, match="_SUCCESS says every shard is done, but 1 of the 2 shards"):
        run_index(IndexConfig(str(emb), str(tmp_path / "built"), kind="flat"))
    assert not (tmp_path / "built").exists()
    code, report = verify(emb)
    assert code == 1 and any("_SUCCESS says every shard is done" in p for p in report["problems"]), report
