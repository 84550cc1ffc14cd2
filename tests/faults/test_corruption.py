"""Corruption caught by `verify`, repaired by a rerun, refused by `index` (issue 16, items 9-12).

Each done record holds its Parquet file's size and sha256 (and the inode and ctime it had at commit, so a
rerun reads only files that were written to since). Every corruption below is made to a real run folder.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import store
from pipeline.cli import cli
from pipeline.embedding.run_folder import file_check
from pipeline.verify import run_verify
from shards import jpeg_bytes, sample_image, write_tar
import tiny


pytestmark = pytest.mark.slow  # real processes and files: in `make test`, not in the fast subset


ARGS = tiny.cli_args(out_dtype="float32", batch_size=8)


def samples(prefix: str, n: int = 4, seed: int = 0) -> list[dict]:
    return [{"__key__": f"{prefix}{i}", "jpg": jpeg_bytes(sample_image((40, 32), seed=seed + i)), "cls": i}
            for i in range(n)]


def embed(*args) -> str:
    r = CliRunner().invoke(cli, ["embed", *map(str, args), *ARGS])
    assert r.exit_code == 0 and r.exception is None, r.output
    return r.output


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    shards = [write_tar(root / "in" / f"c-{s}.tar", samples(f"c{s}_", seed=10 * s)) for s in range(2)]
    embed(*shards, "--out", root / "out")
    return shards, root / "out"


@pytest.fixture
def folder(clean, tmp_path):
    shards, out = clean
    shutil.copytree(out, tmp_path / "out")
    return shards, tmp_path / "out", tmp_path / "out" / "embeddings" / "c-0.parquet"


def rewrite(f: Path, change) -> None:
    """Rewrite a Parquet file as a valid one whose table is ``change(table)`` (metadata kept)."""
    t = pq.read_table(f)
    pq.write_table(change(t).replace_schema_metadata(t.schema.metadata), f)


def with_embeddings(t: pa.Table, edit) -> pa.Table:
    e = store.embedding_matrix(t.column("embedding")).copy()
    edit(e)
    col = pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1), pa.float32()), e.shape[1])
    return t.set_column(t.column_names.index("embedding"), "embedding", col)


def flip_byte(f: Path, keep_times: bool = False) -> None:
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the data pages
    with open(f, "r+b") as h:
        h.write(data)
    if keep_times:  # as `touch -r` would: the modification time says nothing changed (the ctime does)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


CORRUPT = {
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "byte_flipped": flip_byte,
    "byte_flipped_times_kept": lambda f: flip_byte(f, keep_times=True),
    "nan_edited": lambda f: rewrite(f, lambda t: with_embeddings(t, lambda e: e.__setitem__((1, 3), np.nan))),
    "finite_edit": lambda f: rewrite(f, lambda t: with_embeddings(t, lambda e: e.__setitem__((1, 3), e[1, 3] + 0.25))),
    "rows_swapped": lambda f: rewrite(f, lambda t: with_embeddings(t, lambda e: e.__setitem__([0, 1], e[[1, 0]]))),
    "row_removed": lambda f: rewrite(f, lambda t: t.slice(0, t.num_rows - 1)),
    "row_duplicated": lambda f: rewrite(f, lambda t: pa.concat_tables([t, t.slice(0, 1)])),
}


# ---------------------------------------------------------------- 9. stable output names


def test_same_named_shard_from_another_folder_in_a_later_run_keeps_the_first_ones_name(tmp_path, embedpipe):
    a = write_tar(tmp_path / "a" / "s.tar", samples("a", 3))
    b = write_tar(tmp_path / "b" / "s.tar", samples("b", 3, seed=50))
    out, idx = tmp_path / "out", tmp_path / "idx"
    embed(a, "--out", out)
    assert embedpipe("index", out, "--out", idx, "--kind", "flat", "-q")[0] == 0
    again = embed(a, b, "--out", out)
    assert "from 2/2 shards (1 already done, 0 failed)" in again  # a is not embedded again under a new name
    names = {p.name for p in (out / "embeddings").glob("*.parquet")}
    assert "s.parquet" in names and len(names) == 2
    assert json.loads((out / "_state" / "s.json").read_text())["url"] == str(a)
    batch = store.read_all(out)
    assert len(batch.keys) == len(set(batch.keys)) == 6 and run_verify(out)[0] == []
    code, said, _ = embedpipe("status", out)
    assert code == 0 and "2/2 shards done" in said
    code, said, err = embedpipe("index", out, "--out", idx, "--update", "-q")
    assert code == 0, err
    assert json.loads((idx / "index.json").read_text())["count"] == 6
    assert "(1 already done, 0 failed)" in embed(b, "--out", out)  # b alone: the name it was given, still


# ---------------------------------------------------------------- 10. the rerun redoes changed files


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_rerun_redoes_a_done_shard_whose_file_changed(folder, kind, caplog):
    shards, out, f = folder
    want = pq.read_table(f)
    CORRUPT[kind](f)
    said = embed(*shards, "--out", out)
    assert "from 2/2 shards (1 already done, 0 failed)" in said  # the changed one embedded again
    assert "does not match its done record" in caplog.text
    got = pq.read_table(f)
    assert got.column("key").to_pylist() == want.column("key").to_pylist()
    assert np.abs(store.embedding_matrix(got.column("embedding"))
                  - store.embedding_matrix(want.column("embedding"))).max() < 1e-5
    assert run_verify(out)[0] == [] and (out / "_SUCCESS").is_file()


def test_rerun_of_an_untouched_folder_reads_no_file(clean, monkeypatch):
    shards, out = clean
    from pipeline import atomic

    monkeypatch.setattr(atomic, "file_sha256", lambda p: pytest.fail(f"{p} was read"))
    assert "nothing to do" in embed(*shards, "--out", out)  # a stat per file: inode, ctime and size as recorded


# ---------------------------------------------------------------- 11. verify


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_verify_reports_every_change_to_a_file(folder, kind):
    _, out, f = folder
    CORRUPT[kind](f)
    problems = run_verify(out)[0]
    assert any(str(f) in p and ("sha256 differs" in p or "bytes, its done record says" in p) for p in problems), problems


@pytest.mark.parametrize("what", ["empty_done_record", "garbage_done_record", "garbage_run_json", "empty_run_json"])
def test_unreadable_records_are_problems_and_clear_errors_never_tracebacks(folder, what, embedpipe):
    shards, out, _ = folder
    target = out / ("run.json" if "run_json" in what else "_state/c-0.json")
    target.write_bytes(b"" if what.startswith("empty") else b"{not json")
    code, said, err = embedpipe("verify", out)
    assert code == 1 and "Traceback" not in err and f"  {target}: unreadable" in said, said + err
    code, said, err = embedpipe("status", out)
    assert "Traceback" not in err and (code == 2 and "run.json is unreadable" in err if "run_json" in what
                                       else code == 0 and "1/2 shards done" in said)
    code, said, err = embedpipe("embed", *shards, "--out", out, *ARGS)
    if "run_json" in what:  # the record of how the embeddings were made: restore it, or start again
        assert code == 2 and err.count("\n") == 1 and "run.json is unreadable" in err and "--overwrite" in err
    else:  # the shard is simply not done: embedded again
        assert code == 0 and "(1 already done, 0 failed)" in said and run_verify(out)[0] == []


# ---------------------------------------------------------------- 12. index refuses garbage


def vouch_for(out: Path, f: Path) -> None:
    """Make the done record match the changed file, as if the model itself had written it."""
    rec_path = out / "_state" / f"{f.stem}.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps({**rec, "file": file_check(f)}))


@pytest.mark.parametrize("kind,expected", [
    ("nan_edited", "its done record"),  # size or sha256
    ("nan_made_by_the_model", "1 embedding(s) with NaN or Inf (first key 'c0_1')"),
    ("missing", "the file is missing"),
    ("row_removed", "its done record"),
    ("truncated_footer", "bytes, its done record says"),
    ("truncated_footer_vouched", "is not a readable Parquet file"),
    ("bytes_cut_mid_file_vouched", "is not a readable Parquet file (ZSTD decompression failed"),  # footer intact
    ("record_rows_edited", "it has 4 rows, its done record says 3"),  # the file as committed, the record edited
])
def test_index_refuses_input_its_done_records_do_not_vouch_for(folder, tmp_path, kind, expected, embedpipe):
    _, out, f = folder
    if kind == "missing":
        f.unlink()
    elif kind.startswith("truncated_footer"):
        f.write_bytes(f.read_bytes()[:-40])
    elif kind.startswith("bytes_cut"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 4] + data[len(data) // 4 + 100:])
    elif kind == "record_rows_edited":
        rec_path = out / "_state" / f"{f.stem}.json"
        rec_path.write_text(json.dumps({**json.loads(rec_path.read_text()), "embedded": 3}))
    else:
        CORRUPT[kind if kind != "nan_made_by_the_model" else "nan_edited"](f)
    if kind.endswith(("vouched", "by_the_model")):
        vouch_for(out, f)
    for update in (False, True):
        idx = tmp_path / f"idx-{update}"
        if update:  # an index of the sound shard exists (built before the folder was complete); the changed one is new
            shutil.move(out / "_state" / "c-0.json", tmp_path / "held")
            shutil.move(out / "_SUCCESS", tmp_path / "held-success")
            assert embedpipe("index", out, "--out", idx, "--kind", "flat", "-q")[0] == 0
            shutil.move(tmp_path / "held", out / "_state" / "c-0.json")
            shutil.move(tmp_path / "held-success", out / "_SUCCESS")
        code, _, err = embedpipe("index", out, "--out", idx, *(["--update"] if update else ["--kind", "flat"]), "-q")
        assert code == 2 and "Traceback" not in err and str(f) in err and expected in err, err
        assert err.count("\n") == 1, err
        if update:  # untouched
            assert json.loads((idx / "index.json").read_text())["count"] == 4
        else:
            assert not idx.exists()


def test_index_leaves_out_a_file_without_done_record_and_says_so(folder, tmp_path, embedpipe, caplog):
    _, out, f = folder
    (out / "_state" / "c-0.json").unlink()  # c-0 is being embedded (or was killed before its record)
    (out / "_SUCCESS").unlink()  # so the folder is not complete: index builds what is done
    code, _, err = embedpipe("index", out, "--out", tmp_path / "idx", "--kind", "flat", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["count"] == 4
    assert "1 file(s) in" in caplog.text and "have no done record and are left out" in caplog.text


def test_index_of_bare_parquet_files_refuses_nan_naming_the_file(tmp_path, embedpipe):
    from index_data import clustered, write_shards

    x = clustered(300, 16, seed=1)
    x[123, 4] = np.nan
    files = write_shards(tmp_path / "emb", x, shards=3)
    code, _, err = embedpipe("index", tmp_path / "emb", "--out", tmp_path / "idx", "--kind", "flat", "-q")
    assert code == 2 and f"{files[1]}: 1 embedding(s) with NaN or Inf" in err and not (tmp_path / "idx").exists()
