"""The dataset card (winnow.card) of real tiny runs (local backend):

- every count and threshold in ``card.json`` equals ``_summary.json`` and the thresholds step's
  ``thresholds/thresholds.json``, and ``CARD.md`` shows each;
- a keep-fraction filter is "chosen by keep_fraction" with the threshold it computed;
- models and weights: the digests the stage fingerprints record (a real head weights file: its
  sha256), the preprocessing, the sources, winnow's version;
- a rerun (and a report on its own) rebuilds the same card, byte for byte, from storage;
- the EU AI Act fields: each filled one names its source, the rest are the owner's;
- with a corpus: the takedowns the run applied, the corpus's runs, and the corpus's own card.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests._tiny import tiny_config

pytestmark = pytest.mark.timeout(600)


def _run(root: Path, run_key: str = "carded", **extra):
    from winnow.data.sample import generate_sample
    from winnow.pipeline import run_all

    if not (root / "in").exists():
        generate_sample(str(root / "in"), shards=2, per_shard=8, seed=3, corrupt=True)
    cfg = tiny_config(input_uri=str(root / "in"), output_root=str(root / "out"), run_key=run_key, buffer_size=4,
                      max_partitions=2, **extra)
    return cfg, run_all(cfg, backend="local")


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """A run with a real aesthetic head weights file (an untrained MLP: its scores say nothing, so
    a keep fraction sets its threshold), a fixed NSFW threshold and the CLIP-score filter on by
    keep fraction."""
    from safetensors.torch import save_file

    from winnow.stages.heads import AestheticMLP

    root = tmp_path_factory.mktemp("card")
    head = root / "aesthetic.safetensors"
    save_file(AestheticMLP(embed_dim=768).state_dict(), str(head))
    cfg, summary = _run(root, aesthetic_keep_fraction=0.9, nsfw_threshold=0.6, clip_score_keep_fraction=0.5,
                        aesthetic_weights=str(head))
    run_root = Path(cfg.run_root)
    return {"cfg": cfg, "summary": summary, "root": run_root, "head": head,
            "card": json.loads((run_root / "card.json").read_text()), "md": (run_root / "CARD.md").read_text(),
            "stored": json.loads((run_root / "_summary.json").read_text()),
            "thresholds": json.loads((run_root / "thresholds" / "thresholds.json").read_text())["filters"]}


def _row(md: str, section: str, first_cell: str) -> str:
    """The table row of CARD.md's section ``section`` whose first cell is ``first_cell``."""
    text = md.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (section, first_cell, rows)
    return rows[0]


def test_every_count_and_threshold_in_the_card_equals_the_summary_and_the_thresholds_file(carded):
    from winnow.card import _num
    from winnow.filters import COUNT_NAMES, FILTERS

    card, stored, thresholds, md = carded["card"], carded["stored"], carded["thresholds"], carded["md"]
    counts = card["counts"]
    assert counts["records"] == stored["records"] > 0
    assert counts["outcomes"] == [{"outcome": o, "count": n, "records": stored[n]} for o, n in COUNT_NAMES.items()]
    assert sum(o["records"] for o in counts["outcomes"]) == stored["records"]
    assert counts["written"] == stored["written"] and counts["skipped_members"] == stored["skipped_members"]
    assert card["dedup"]["duplicates"] == stored["duplicates"]
    assert card["dedup"]["exact_duplicates"] == stored["exact_duplicates"]
    assert card["sources"]["shards"] == stored["shards"] == 2
    # Every declared filter, in list order, with the threshold the run used.
    assert [f["name"] for f in card["filters"]] == [f.name for f in FILTERS]
    for f in card["filters"]:
        t = thresholds[f["name"]]
        assert f["threshold"] == t["threshold"] == stored["thresholds"][f["name"]], f
        assert f["keep"] == t["keep"] and f["param"] == t["source"] and f["keep_fraction"] == t["keep_fraction"]
        assert f["enabled"] == t.get("enabled", True)
        assert f["dropped"] == stored[f["count"]]
    # CARD.md shows them all.
    assert _row(md, "Sources", "records indexed").endswith(f"| {stored['records']} |")
    for outcome, name in COUNT_NAMES.items():
        assert _row(md, "Counts", outcome).endswith(f"| `{name}` | {stored[name]} |"), outcome
    assert _row(md, "Counts", "written").endswith(f"| {stored['written']} |")
    for f in card["filters"]:
        row = _row(md, "Filters", f["name"])
        if f["enabled"]:
            assert f"| {_num(f['threshold'])} |" in row and f"{stored[f['count']]} (`{f['count']}`" in row, row
        else:
            assert "| off (" in row, row


def test_a_keep_fraction_filter_says_chosen_by_keep_fraction_with_the_threshold_it_computed(carded):
    card, thresholds, md = carded["card"], carded["thresholds"], carded["md"]
    by = {f["name"]: f for f in card["filters"]}
    clip, t = by["clip_score"], thresholds["clip_score"]
    assert clip["chosen_by"] == "keep_fraction" and clip["keep_fraction"] == 0.5
    assert clip["threshold"] == t["threshold"] != t["absolute"]
    assert (clip["scored"], clip["keep_count"]) == (t["scored"], t["keep_count"])
    row = _row(md, "Filters", "clip_score")
    assert f"chosen by keep_fraction: clip_score_keep_fraction = 0.5 -> computed, keeps {t['keep_count']} of " \
           f"{t['scored']} scored" in row and json.dumps(t["threshold"]) in row
    assert by["nsfw"]["chosen_by"] == "threshold" and "fixed threshold (nsfw_threshold)" in _row(md, "Filters", "nsfw")
    assert by["nsfw"]["threshold"] == 0.6 and "| 0.6 |" in _row(md, "Filters", "nsfw")
    assert by["aesthetic"]["chosen_by"] == "keep_fraction" and by["aesthetic"]["threshold"] == thresholds["aesthetic"]["threshold"]


def test_models_weights_preprocessing_sources_and_version_come_from_the_stored_fingerprints(carded):
    from importlib.metadata import version

    card, root, md = carded["card"], carded["root"], carded["md"]

    def fp(stage: str) -> dict:
        return json.loads((root / stage / "_stage.json").read_text())

    embed = fp("embed")["config"]
    emb = card["models"]["embedding"]
    assert (emb["model"], emb["pretrained"], emb["weights_digest"], emb["embed_dim"]) == \
        ("winnow-tiny-vit", "random", embed["weights_digest"], embed["embed_dim"])
    weights = {w["stage"]: w for w in card["models"]["weights"]}
    sha = "sha256:" + hashlib.sha256(carded["head"].read_bytes()).hexdigest()
    assert weights["aesthetic"]["weights_digest"] == fp("aesthetic")["config"]["weights_digest"] == sha
    assert weights["aesthetic"]["weights_file"] == str(carded["head"]) and not weights["aesthetic"]["random"]
    assert weights["nsfw"]["weights_digest"] == fp("nsfw")["config"]["weights_digest"] == "random-seed1"
    assert card["models"]["random_weights"] and "**Random weights**" in md
    assert f"`{sha}`" in _row(md, "Models and weights", "aesthetic") and str(carded["head"]) in _row(md, "Models and weights", "aesthetic")
    pre = card["preprocessing"]
    assert {k: v for k, v in pre["image"].items() if k != "resize"} == embed["preprocess"]
    assert pre["image"]["resize"] == "resize the shorter side to 32, then centre-crop to 32x32"
    assert (pre["precision"], pre["max_pixels"], pre["decoder"]) == (embed["precision"], embed["max_pixels"], "auto")
    assert pre["image"]["resize"] in md and "| decoder | auto |" in md
    index = json.loads((root / "index" / "_index.json").read_text())
    src = card["sources"]
    assert (src["input_uri"], src["shard_uris"], src["records"]) == (index["input_uri"], index["shards"], index["num_records"])
    assert src["bytes"] is None and "not recorded" in src["bytes_note"]
    assert src["listing_digest"] == fp("index")["config"]["shards_digest"]
    assert card["run"]["winnow"]["version"] == version("airflow-winnow")
    assert card["run"]["run_key"] == "carded" and card["run"]["logical_date"] is None
    assert card["dedup"]["configured"]["dedup_eps"] == carded["cfg"].dedup_eps
    assert card["dedup"]["fingerprinted"]["pairwise"] == fp("pairwise")["config"]
    assert card["dedup"]["used"]["k"] >= 1
    assert card["provenance"]["fingerprints"]["thresholds"] == fp("thresholds")["digest"]


def test_the_eu_ai_act_fields_name_their_source_or_are_left_to_the_owner(carded):
    from winnow.card import OWNER

    fields = carded["card"]["eu_ai_act"]["fields"]
    assert {f["section"][0] for f in fields} == {"1", "2", "3"}
    filled = [f for f in fields if f["status"] != OWNER]
    assert filled and all(f["value"] is not None and f["source"] for f in filled)
    assert all(f["value"] is None and f["source"] is None for f in fields if f["status"] == OWNER)
    by = {f["field"]: f for f in filled}
    assert by["Data sources used by this run (input locations)"]["value"]["input_uri"] == carded["card"]["sources"]["input_uri"]
    optout = next(f for f in filled if f["section"] == "3.1")
    assert "no corpus" in optout["value"]
    md = carded["md"]
    assert "## EU AI Act: public summary of training content" in md and f"_{OWNER}_" in md


def test_a_rerun_and_a_report_alone_rebuild_the_same_card_from_storage(carded):
    from winnow.pipeline import run_all, run_report

    root = carded["root"]
    before = {name: (root / name).read_bytes() for name in ("card.json", "CARD.md")}
    for name in before:
        (root / name).unlink()
    again = run_all(carded["cfg"], backend="local")
    assert again["row_groups_computed"] == 0  # nothing recomputed: the card is built from storage
    assert {name: (root / name).read_bytes() for name in before} == before
    run_report(carded["cfg"])  # no partition summaries: the card does not depend on them
    assert {name: (root / name).read_bytes() for name in before} == before


def test_the_card_of_a_run_with_a_corpus_shows_the_takedowns_it_applied_and_the_corpus(tmp_path):
    from tests._corpus_data import RUN_PARAMS, make_dates
    from winnow.card import OWNER, build_card, summary_count, write_corpus_card
    from winnow.corpus import takedown
    from winnow.filters import ALL_COUNT_NAMES
    from winnow.pipeline import run_all

    dates = ("2025-03-01", "2025-03-02")
    data = make_dates(tmp_path / "shards", dates=dates, per_shard=8)
    out, corpus = tmp_path / "out", tmp_path / "corpus"

    def cfg(date: str):
        return tiny_config(input_uri=data["dates"][date]["input_uri"], output_root=str(out), run_key=date.replace("-", ""),
                           buffer_size=8, max_partitions=2, corpus_uri=str(corpus), **RUN_PARAMS)

    run_all(cfg(dates[0]), backend="local", logical_date=dates[0])
    # A takedown of the first date's record that the second date copies byte for byte.
    copy = next(c for c in data["dates"][dates[1]]["copies"] if c["how"] == "bytes" and c["of_outcome"] == "kept")
    listed = tmp_path / "takedown.txt"
    listed.write_text(f"{copy['of_uid']}\n")
    takedown(str(corpus), str(listed), reason="opt-out request", date="2025-03-02", storage=None)
    second = cfg(dates[1])
    summary = run_all(second, backend="local", logical_date=dates[1])
    assert summary["takedowns"] >= 1
    root = Path(second.run_root)
    card = json.loads((root / "card.json").read_text())
    md = (root / "CARD.md").read_text()
    td = card["takedowns"]
    assert td["applied"] and td["records_dropped"] == summary["takedowns"]
    (t,) = td["takedowns"]
    assert (t["reason"], t["date"], t["identifiers"], t["in_force_at_check"]) == ("opt-out request", "2025-03-02", 1, True)
    assert summary_count(card["counts"], "takedown") == summary["takedowns"]
    assert summary_count(card["counts"], "corpus_duplicate") == summary["corpus_duplicates"]
    assert [o["outcome"] for o in card["counts"]["outcomes"]] == list(ALL_COUNT_NAMES)
    assert card["corpus"]["corpus_uri"] == str(corpus)
    assert [r["run_key"] for r in card["corpus"]["runs"]][:1] == ["20250301"]
    assert "## Takedowns" in md and "opt-out request" in md and "## Corpus" in md
    optout = next(f for f in card["eu_ai_act"]["fields"] if f["section"] == "3.1" and f["status"] != OWNER)
    assert f"{summary['takedowns']} records dropped before decode" in optout["value"]
    # run_all reports before it publishes: rebuilt now, the card shows the run published, with its date.
    now = build_card(second.root)
    assert now["corpus"]["this_run"]["published"] and now["run"]["logical_date"] == dates[1]
    # The corpus's own card: its runs, totals and takedowns, from its head; the publish wrote it.
    ccard = json.loads((corpus / "card.json").read_text())
    assert write_corpus_card(str(corpus)) == ccard
    assert [r["run_key"] for r in ccard["runs"]] == ["20250301", "20250302"]
    assert ccard["published_records"] == sum(r["records"] for r in ccard["runs"])
    assert ccard["taken_down"] == 1 and ccard["records"] == ccard["published_records"] - 1
    cmd = (corpus / "CARD.md").read_text()
    assert "20250302" in cmd and "opt-out request" in cmd
