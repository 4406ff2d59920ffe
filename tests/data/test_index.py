"""The index stage: the WebDataset key rule, tar header scans, counts, resumability and the
stage fingerprint, on real tar files."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pytest

from tests.data._shards import tree_snapshot, write_tar
from winnow.data.index import SCAN_DIR, IndexConfig, build_index, load_index
from winnow.data.sample import generate_sample
from winnow.data.shards import list_shards
from winnow.data.tarscan import scan_shard, split_key
from winnow.exceptions import InputError, ShardError, StageConfigMismatch, StorageError
from winnow.rowgroups.store import CommitStore
from winnow.schemas import INDEX


def _all_rows(run_root: str) -> pa.Table:
    result = load_index(run_root)
    store = CommitStore(run_root)
    plan = result.plan
    parts = [
        store.read_table("index", plan.partition_of(rg), rg) for rg in range(plan.num_row_groups)
    ]
    return pa.concat_tables(parts)


@pytest.fixture(scope="module")
def corrupt_sample(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("input") / "shards")
    return out, generate_sample(out, shards=3, per_shard=10, seed=11, corrupt=True, bad_shards=True)


# ---- the key rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000123.jpg", ("000123", "jpg")),
        ("000123.JPG", ("000123", "jpg")),
        ("000123.seg.png", ("000123", "seg.png")),
        ("a.b/c.d/000123.txt", ("a.b/c.d/000123", "txt")),
        ("dir/sub/Key.Json", ("dir/sub/Key", "json")),
        ("../../escape/000001.jpg", ("../../escape/000001", "jpg")),
        ("/abs/000001.jpg", ("/abs/000001", "jpg")),
        ("README", ("README", "")),
        ("dir.x/README", ("dir.x/README", "")),
    ],
)
def test_split_key_takes_key_to_first_dot_of_basename_and_lowercases_ext(name, expected):
    assert split_key(name) == expected


def test_split_key_agrees_with_webdataset_on_every_name():
    from webdataset.tariterators import base_plus_ext

    for name in ["000123.jpg", "a.b/c.d/000123.seg.png", "dir/sub/Key.Json", "../x/1.jpg", "/a/1.txt"]:
        key, ext = base_plus_ext(name)
        assert split_key(name) == (key, ext.lower())


# ---- tar header scan -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_scan_offsets_match_tarfile_for_long_and_prefixed_names(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 60  # > 100 chars: ustar prefix, GNU long name or pax path
    members = [
        (f"{deep}/000001.jpg", b"\xff\xd8one"),
        (f"{deep}/000001.txt", b"caption one"),
        ("short/000002.png", b"png" * 300),
        ("short/000002.json", b"{}"),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(("x" * 150 + "ü/000003.webp", b"webp bytes"))  # name no prefix can hold
    shard = write_tar(str(tmp_path / "s.tar"), members, fmt=fmt)
    scan = scan_shard(shard)
    with tarfile.open(shard) as tar:
        want = {m.name: (m.offset_data, m.size) for m in tar.getmembers()}
    assert scan.keys[:2] == [f"{deep}/000001", "short/000002"]
    assert (scan.image_offset[0], scan.image_size[0]) == want[f"{deep}/000001.jpg"]
    assert (scan.txt_offset[0], scan.txt_size[0]) == want[f"{deep}/000001.txt"]
    assert (scan.json_offset[1], scan.json_size[1]) == want["short/000002.json"]
    assert scan.txt_offset[1] is None and scan.json_offset[0] is None
    if fmt != tarfile.USTAR_FORMAT:
        assert scan.keys[2] == "x" * 150 + "ü/000003"
        assert scan.image_ext[2] == "webp"


def test_scan_groups_records_counts_orphans_duplicates_and_extra_images(tmp_path):
    shard = write_tar(
        str(tmp_path / "s.tar"),
        [
            ("a.png", b"p"), ("a.JPG", b"j"), ("a.txt", b"t"),  # two images: jpg wins by order
            ("b.txt", b"orphan caption"),  # no image: counted, skipped
            ("c.webp", b"w"),
            ("a.jpg", b"again"),  # key a again later in the shard: dropped
            ("c.webp", b"w2"), ("c.json", b"{}"),  # c again, not consecutive: dropped
            ("d.jpeg", b"jj"), ("d.jpeg", b"jj2"),  # same key and ext twice in one record
            ("dir/", b""), ("README", b"x"),
        ],
    )
    scan = scan_shard(shard)
    assert scan.keys == ["a", "c", "d"]
    assert scan.image_ext == ["jpg", "webp", "jpeg"]
    assert scan.extra_images == 1
    assert scan.members_without_image == 1
    assert scan.duplicate_keys == 3
    assert scan.ignored_members == 1  # README has no extension; "dir/" is a folder, not a member
    with tarfile.open(shard) as tar:
        a_jpg = next(m for m in tar.getmembers() if m.name == "a.JPG")
        d_first = next(m for m in tar.getmembers() if m.name == "d.jpeg")
    assert scan.image_offset[0] == a_jpg.offset_data
    assert scan.image_offset[2] == d_first.offset_data


def test_truncated_shard_raises_shard_error_naming_it(tmp_path):
    whole = write_tar(str(tmp_path / "whole.tar"), [("k.jpg", b"x" * 5000), ("k.txt", b"cap")])
    data = open(whole, "rb").read()
    cut = str(tmp_path / "cut.tar")
    open(cut, "wb").write(data[:2000])
    with pytest.raises(ShardError) as info:
        scan_shard(cut)
    assert info.value.shard == cut and cut in str(info.value) and "truncated" in str(info.value)
    half_header = str(tmp_path / "half.tar")
    open(half_header, "wb").write(data[: 512 + 5120 + 100])  # ends inside the second header
    with pytest.raises(ShardError, match="truncated"):
        scan_shard(half_header)


def test_non_tar_and_missing_files_raise_shard_error(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ShardError, match="broken tar header"):
        scan_shard(str(junk))
    with pytest.raises(ShardError) as info:
        scan_shard(str(tmp_path / "nope.tar"))
    assert info.value.shard == str(tmp_path / "nope.tar")


def test_zero_byte_shard_is_counted_not_an_error(tmp_path):
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    scan = scan_shard(str(empty))
    assert scan.zero_byte and scan.records == 0


def test_scan_reads_each_image_and_caption_once_and_never_other_member_data(tmp_path):
    """Fault-injection-style wrapper around the real pyarrow file: it records every read. The
    scan reads the image (its uid and header size) and the caption (its words, for the
    caption-length filter), once each; a member it has no use for (a .cls label) never."""
    import pyarrow.fs as pafs

    from winnow.data.tarscan import image_uid

    big = b"\xff" * 1_000_000
    caption = b"c " * 350_000  # 700 kB, 350000 words
    label = b"\x00" * 600_000
    members = []
    for i in range(5):
        members += [(f"{i:03d}.jpg", big[: len(big) - i] + bytes([i])), (f"{i:03d}.txt", caption),
                    (f"{i:03d}.cls", label)]
    shard = write_tar(str(tmp_path / "s.tar"), members)
    read: list[tuple[int, int]] = []

    class CountingFile:
        def __init__(self, f):
            self.f = f

        def read_at(self, n, offset):
            read.append((offset, n))
            return self.f.read_at(n, offset)

        def size(self):
            return self.f.size()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    class CountingFS:
        def open_input_file(self, path):
            return CountingFile(pafs.LocalFileSystem().open_input_file(path))

    scan = scan_shard(shard, filesystem=CountingFS())
    assert scan.records == 5
    assert scan.uid == [image_uid(data) for name, data in members if name.endswith(".jpg")]
    assert scan.caption_words == [350_000] * 5
    data_reads = sorted((o, n) for o, n in read if n > 512)
    # Each image and each caption once; nothing of the labels.
    assert data_reads == sorted([*zip(scan.image_offset, scan.image_size), *zip(scan.txt_offset, scan.txt_size)])
    assert sum(n for _, n in read) <= sum(scan.image_size) + sum(scan.txt_size) + 512 * 16  # and the headers


# ---- listing -------------------------------------------------------------------------------


def test_list_shards_recursive_sorted_and_errors(tmp_path):
    write_tar(str(tmp_path / "in" / "b" / "x.tar"), [("1.jpg", b"1")])
    write_tar(str(tmp_path / "in" / "a.tar"), [("1.jpg", b"1")])
    (tmp_path / "in" / "notes.txt").write_text("not a shard")
    assert list_shards(str(tmp_path / "in")) == [str(tmp_path / "in" / "a.tar"), str(tmp_path / "in" / "b" / "x.tar")]
    assert list_shards(str(tmp_path / "in" / "a.tar")) == [str(tmp_path / "in" / "a.tar")]
    assert list_shards(f"file://{tmp_path}/in") == [f"file://{tmp_path}/in/a.tar", f"file://{tmp_path}/in/b/x.tar"]
    with pytest.raises(InputError, match="does not exist"):
        list_shards(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .tar files"):
        list_shards(str(tmp_path / "empty"))


# ---- the index stage -----------------------------------------------------------------------


def test_index_of_corrupt_sample_counts_and_stays_inside_run_root(corrupt_sample, tmp_path):
    input_dir, manifest = corrupt_sample
    parent = tmp_path / "parent"
    run_root = parent / "runs" / "r1"
    parent.mkdir()
    (parent / "sentinel").write_text("x")
    before_outside = tree_snapshot(str(tmp_path), exclude=str(run_root))
    before_input = tree_snapshot(input_dir)

    result = build_index(str(run_root), IndexConfig(input_uri=input_dir, buffer_size=7, skip_bad_shards=True))

    assert tree_snapshot(str(tmp_path), exclude=str(run_root)) == {**before_outside, "parent/runs": (-1, 0)}
    assert tree_snapshot(input_dir) == before_input
    expected = manifest["expected"]
    for name in ("records", "members_without_image", "duplicate_keys", "shards", "zero_byte_shards", "bad_shards"):
        assert result.counts[name] == expected[name], name
    assert result.num_records == expected["records"] == result.plan.num_records
    truncated = next(b["shard"] for b in manifest["bad_shards"] if b["kind"] == "truncated_tar")
    assert [e["shard"] for e in result.counts["bad_shard_errors"]] == [os.path.join(input_dir, truncated)]
    rows = _all_rows(str(run_root))
    assert rows.schema == INDEX
    keys = rows.column("key").to_pylist()
    traversal = [c["key"] for c in manifest["corrupt"] if c["kind"] in ("parent_traversal_name", "absolute_name")]
    assert set(traversal) <= set(keys)
    assert rows.column("record_id").to_pylist() == list(range(len(keys)))
    assert len(set(keys)) == len(keys)
    # Shard order then member order: the first shard's ten records come first, in order.
    assert keys[:10] == [f"0000{i:05d}" for i in range(10)]
    zero_image = next(c["key"] for c in manifest["corrupt"] if c["kind"] == "zero_byte_image")
    assert rows.filter(pa.compute.equal(rows["key"], zero_image))["image_size"].to_pylist() == [0]
    # Every committed file lies under the run root.
    for folder, _, _files in os.walk(run_root):
        assert os.path.realpath(folder).startswith(os.path.realpath(run_root))


def test_bad_shard_fails_the_index_unless_skipped(corrupt_sample, tmp_path):
    input_dir, manifest = corrupt_sample
    truncated = os.path.join(input_dir, next(b["shard"] for b in manifest["bad_shards"] if b["kind"] == "truncated_tar"))
    with pytest.raises(ShardError) as info:
        build_index(str(tmp_path / "run"), IndexConfig(input_uri=input_dir, buffer_size=8))
    assert info.value.shard == truncated and truncated in str(info.value)
    assert not (tmp_path / "run" / "index").exists()


def test_rerun_scans_no_shard_and_commits_only_missing_row_groups(corrupt_sample, tmp_path):
    input_dir, _ = corrupt_sample
    run_root = str(tmp_path / "run")
    config = IndexConfig(input_uri=input_dir, buffer_size=5, skip_bad_shards=True)
    logs: list[str] = []
    first = build_index(run_root, config, log=logs.append)
    assert first.shards_scanned == 5 and first.row_groups_committed == first.plan.num_row_groups
    assert any("records" in line for line in logs)
    scan_files = {
        os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
        for d, _, fs in os.walk(os.path.join(run_root, SCAN_DIR))
        for f in fs
    }
    rows_first = _all_rows(run_root)
    second = build_index(run_root, config)
    assert (second.shards_scanned, second.row_groups_committed) == (0, 0)
    assert {p: os.stat(p).st_mtime_ns for p in scan_files} == scan_files
    assert second.counts == first.counts

    # Lose one row group and one shard scan: exactly those are redone.
    store = CommitStore(run_root)
    os.unlink(store.row_group_path("index", first.plan.partition_of(3), 3))
    os.unlink(next(p for p in scan_files if p.endswith(f"{os.sep}g000001.parquet")))  # one shard per group
    third = build_index(run_root, config)
    assert (third.shards_scanned, third.row_groups_committed) == (1, 1)
    assert _all_rows(run_root).equals(rows_first)
    assert third.counts == first.counts


def test_other_buffer_size_or_input_on_same_run_root_is_a_config_mismatch(corrupt_sample, tmp_path):
    input_dir, _ = corrupt_sample
    run_root = str(tmp_path / "run")
    build_index(run_root, IndexConfig(input_uri=input_dir, buffer_size=5, skip_bad_shards=True))
    with pytest.raises(StageConfigMismatch, match="buffer_size"):
        build_index(run_root, IndexConfig(input_uri=input_dir, buffer_size=6, skip_bad_shards=True))
    other = str(tmp_path / "other")
    write_tar(os.path.join(other, "s.tar"), [("1.jpg", b"x")])
    with pytest.raises(StageConfigMismatch, match="input_uri"):
        build_index(run_root, IndexConfig(input_uri=other, buffer_size=5, skip_bad_shards=True))
    assert len(os.listdir(os.path.join(run_root, SCAN_DIR))) == 1  # the mismatch scanned nothing
    replaced = build_index(run_root, IndexConfig(input_uri=other, buffer_size=5), overwrite=True)
    assert replaced.num_records == 1
    assert any(n.startswith("index.replaced-") for n in os.listdir(run_root))


def test_duplicate_keys_across_shards_keep_the_first_shard(tmp_path):
    write_tar(str(tmp_path / "in" / "a.tar"), [("k1.jpg", b"a1"), ("k2.jpg", b"a2")])
    write_tar(str(tmp_path / "in" / "b.tar"), [("k2.jpg", b"b2"), ("k3.jpg", b"b3")])
    result = build_index(str(tmp_path / "run"), IndexConfig(input_uri=str(tmp_path / "in"), buffer_size=10))
    rows = _all_rows(str(tmp_path / "run"))
    assert rows.column("key").to_pylist() == ["k1", "k2", "k3"]
    assert rows.column("shard").to_pylist()[1].endswith("a.tar")
    assert result.counts["duplicate_keys"] == result.counts["duplicate_keys_across_shards"] == 1
    assert result.counts["duplicate_key_examples"] == ["k2"]


def test_load_index_before_the_index_stage_ran_says_what_to_do(tmp_path):
    with pytest.raises(StorageError, match="run the index stage"):
        load_index(str(tmp_path / "run"))


def test_load_index_returns_what_build_index_saved(corrupt_sample, tmp_path):
    input_dir, _ = corrupt_sample
    built = build_index(str(tmp_path / "run"), IndexConfig(input_uri=input_dir, buffer_size=4, max_partitions=3, skip_bad_shards=True))
    loaded = load_index(str(tmp_path / "run"))
    assert loaded.plan == built.plan and loaded.plan.num_partitions == 3
    assert loaded.counts == json.loads(json.dumps(built.counts))
    assert loaded.shards == built.shards and loaded.num_records == built.num_records
    meta = json.load(open(tmp_path / "run" / "index" / "_index.json"))
    assert meta["num_records"] == built.num_records and meta["buffer_size"] == 4


def test_index_over_a_file_uri(tmp_path):
    write_tar(str(tmp_path / "in" / "a.tar"), [("k1.jpg", b"a1"), ("k1.txt", b"c")])
    result = build_index(str(tmp_path / "run"), IndexConfig(input_uri=f"file://{tmp_path}/in", buffer_size=2))
    assert result.num_records == 1
    assert _all_rows(str(tmp_path / "run")).column("shard").to_pylist() == [f"file://{tmp_path}/in/a.tar"]
