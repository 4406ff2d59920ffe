"""Shard listing on local paths: folders, globs and brace lists (the rule lives in
winnow.data.shards.expand_input), and clear errors for a pattern that matches nothing."""

from __future__ import annotations

import os

import pytest

from winnow.data.shards import expand_braces, glob_regex, list_shard_infos, list_shards
from winnow.exceptions import InputError


@pytest.fixture()
def shards(tmp_path):
    """Empty-but-real files are enough: listing never opens a shard."""
    names = [
        "shards/part-000.tar", "shards/part-001.tar", "shards/part-002.tar", "shards/part-010.tar",
        "shards/notes.txt", "shards/sub/part-900.tar",
        "days/2025-01-01/a.tar", "days/2025-01-02/b.tar", "days/2025-02-01/c.tar",
    ]
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(name)))
    return tmp_path


def _rel(root, listed):
    return [os.path.relpath(p, root) for p in listed]


def test_a_folder_lists_every_tar_below_it_sorted(shards):
    assert _rel(shards, list_shards(str(shards / "shards"))) == [
        "shards/part-000.tar", "shards/part-001.tar", "shards/part-002.tar", "shards/part-010.tar",
        "shards/sub/part-900.tar",
    ]


def test_a_glob_matches_within_its_folder_only(shards):
    got = _rel(shards, list_shards(str(shards / "shards" / "part-00*.tar")))
    assert got == ["shards/part-000.tar", "shards/part-001.tar", "shards/part-002.tar"]


def test_question_mark_and_character_class_globs(shards):
    assert _rel(shards, list_shards(str(shards / "shards" / "part-0?0.tar"))) == [
        "shards/part-000.tar", "shards/part-010.tar"]
    assert _rel(shards, list_shards(str(shards / "shards" / "part-00[12].tar"))) == [
        "shards/part-001.tar", "shards/part-002.tar"]


def test_double_star_crosses_folders(shards):
    assert _rel(shards, list_shards(str(shards / "shards" / "**" / "part-9*.tar"))) == ["shards/sub/part-900.tar"]


def test_a_glob_over_folders_lists_the_tars_inside_them(shards):
    assert _rel(shards, list_shards(str(shards / "days" / "2025-01-*"))) == [
        "days/2025-01-01/a.tar", "days/2025-01-02/b.tar"]


def test_a_numeric_brace_range_keeps_zero_padding(shards):
    assert _rel(shards, list_shards(str(shards / "shards" / "part-{000..002}.tar"))) == [
        "shards/part-000.tar", "shards/part-001.tar", "shards/part-002.tar"]


def test_a_brace_list_of_folders_and_globs(shards):
    got = _rel(shards, list_shards(str(shards / "days" / "{2025-01-02,2025-02-01}")))
    assert got == ["days/2025-01-02/b.tar", "days/2025-02-01/c.tar"]
    got = _rel(shards, list_shards(str(shards) + "/{shards/part-01*.tar,days/2025-02-*}"))
    assert got == ["days/2025-02-01/c.tar", "shards/part-010.tar"]


def test_sizes_come_with_the_listing(shards):
    infos = dict(list_shard_infos(str(shards / "shards" / "part-000.tar")))
    assert list(infos.values()) == [len("shards/part-000.tar")]
    infos = list_shard_infos(str(shards / "shards" / "part-00{0,1}.tar"))
    assert [size for _, size in infos] == [len("shards/part-000.tar")] * 2


def test_a_relative_glob_is_resolved_from_the_working_directory(shards, monkeypatch):
    monkeypatch.chdir(shards)
    assert _rel(shards, list_shards("shards/part-00[0].tar")) == ["shards/part-000.tar"]


def test_a_glob_matching_nothing_names_the_pattern(shards):
    pattern = str(shards / "shards" / "part-7*.tar")
    with pytest.raises(InputError, match="matched nothing") as err:
        list_shards(pattern)
    assert pattern in str(err.value)


def test_a_brace_list_with_a_missing_shard_names_it(shards):
    with pytest.raises(InputError) as err:
        list_shards(str(shards / "shards" / "part-{001..004}.tar"))
    text = str(err.value)
    assert "part-003.tar" in text and "part-004.tar" in text and "part-001.tar'" not in text


def test_a_glob_matching_only_non_tars_says_so(shards):
    with pytest.raises(InputError, match=r"matched no \.tar files"):
        list_shards(str(shards / "shards" / "*.txt"))


def test_a_glob_under_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="matched nothing"):
        list_shards(str(tmp_path / "nowhere" / "*.tar"))


def test_brace_expansion_rules():
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("s-{2..0}") == ["s-2", "s-1", "s-0"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert expand_braces("{a}.tar") == ["{a}.tar"]  # one item without a comma is literal text


def test_glob_star_stays_in_one_folder():
    assert glob_regex("b/*.tar").fullmatch("b/x.tar")
    assert not glob_regex("b/*.tar").fullmatch("b/c/x.tar")
    assert glob_regex("b/**/x.tar").fullmatch("b/x.tar")  # ** also matches no folder
    assert glob_regex("b/[!a]x.tar").fullmatch("b/cx.tar")
    assert not glob_regex("b/[!a]x.tar").fullmatch("b/ax.tar")
