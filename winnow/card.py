"""The dataset card of a run: ``card.json`` and a human-readable ``CARD.md`` beside ``_summary.json``.

The report step writes it (:func:`write_card`, called by :func:`winnow.pipeline.run_report` once
the summary is written), built from what the run root stores and nothing held in memory, so a
rerun of the report rebuilds the same card: the summary's counts, the thresholds step's
``thresholds/thresholds.json`` (the threshold each filter used and how it was chosen), every
stage's ``_stage.json`` fingerprint (model and weights digests, preprocessing, dedup settings),
``index/_index.json`` (sources), the dedup centroids' metadata (the clusters k-means used) and,
for a run with a corpus, the corpus head (runs, takedowns) and the run's corpus-check record. The
card holds no timestamp of its own: it changes only when what it describes changes.

What it holds (``card.json``, ``format`` :data:`CARD_FORMAT`): ``run`` (run key, run root, logical
date where stored, winnow's version), ``sources``, ``models``, ``preprocessing``, ``filters`` (one
entry per filter of :data:`winnow.filters.FILTERS`, in list order), ``dedup``, ``counts``,
``takedowns``, ``corpus`` (None without one), ``eu_ai_act`` (the fields of the EU AI Office's
template for the public summary of training content: those a curation run can fill, each with
where its value came from, and the rest marked as the dataset owner's to fill) and ``provenance``
(the files read, and each stage's fingerprint digest).

A corpus has a card of its own (:func:`write_corpus_card`: ``<corpus>/card.json`` and ``CARD.md``:
its runs, totals and takedowns, from its head alone), rewritten by every publish
(:func:`winnow.pipeline.run_publish`) and every takedown (the ``takedown`` DAG's task).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from winnow.rowgroups import CommitStore, RunRoot
from winnow.rowgroups.store import read_json, write_atomic, write_json

CARD_FILE = "card.json"
CARD_MD = "CARD.md"
CARD_FORMAT = 1
#: The distribution whose version the card names.
DISTRIBUTION = "airflow-winnow"
#: Shard URIs listed on the card (the index lists them all).
MAX_SHARDS_LISTED = 20
OWNER = "to be filled by the dataset owner"
TEMPLATE = ("EU AI Office: Template for the Public Summary of Training Content for general-purpose AI models "
            "(Article 53(1)(d) of the AI Act, July 2025)")

_RESIZE_WORDS = {
    "shortest": "resize the shorter side to {h}, then centre-crop to {h}x{w}",
    "longest": "resize the longer side to {h}, then pad to {h}x{w} with fill colour {fill}",
    "squash": "resize to {h}x{w} (aspect ratio not kept)",
}


# ---- reading the run root ------------------------------------------------------------------------

def winnow_version() -> dict[str, str]:
    """winnow's version from the installed package's metadata (``airflow-winnow``), else the
    module's ``__version__`` (a source checkout that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {"version": version(DISTRIBUTION), "source": f"package metadata of {DISTRIBUTION}"}
    except PackageNotFoundError:
        import winnow

        return {"version": winnow.__version__, "source": "winnow.__version__ (package not installed)"}


def _fingerprints(store: CommitStore) -> dict[str, dict[str, Any]]:
    """Every stage's stored ``_stage.json`` (registry order), for the stages that recorded one."""
    from winnow.registry import STAGES

    out = {}
    for spec in STAGES:
        fp = store.read_fingerprint(spec.name)
        if fp:
            out[spec.name] = fp
    return out


def recorded_weights(fingerprints: Mapping[str, Mapping[str, Any] | None]) -> Iterator[tuple[str, tuple[str, ...], Mapping[str, Any]]]:
    """``(stage, keys, node)`` of every model whose ``weights_digest`` the stages' stored
    fingerprints record: the stage's own (``keys`` empty) and each model nested in its config
    (``keys``: the path to it: embed's watermark detector is under its filter's name).

    >>> [(s, k, n["weights_digest"]) for s, k, n in recorded_weights(
    ...     {"embed": {"config": {"weights_digest": "a", "detector": {"weights_digest": "b"}}}, "dedup": None})]
    [('embed', (), 'a'), ('embed', ('detector',), 'b')]
    """
    def visit(node: Mapping[str, Any], keys: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
        if "weights_digest" in node:
            yield keys, node
        for key, value in node.items():
            if isinstance(value, Mapping) and key != "preprocess":
                yield from visit(value, (*keys, key))

    for stage, fp in fingerprints.items():
        config = (fp or {}).get("config")
        if isinstance(config, Mapping):
            for keys, node in visit(config, ()):
                yield stage, keys, node


def _weights(fps: Mapping[str, dict[str, Any]], run_config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The weights the stages' fingerprints name (:func:`recorded_weights`), each with the run
    param that named its file."""
    found = []
    for stage, keys, cfg in recorded_weights(fps):
        name = keys[-1] if keys else stage
        param = f"{name}_weights" if f"{name}_weights" in run_config else None
        digest = cfg["weights_digest"]
        found.append({
            "stage": stage, "name": name, "model": cfg.get("model"), "weights_digest": digest,
            "random": isinstance(digest, str) and digest.startswith("random"),
            "weights_param": param, "weights_file": run_config.get(param) if param else None,
        })
    return found


def _models(fps: Mapping[str, dict[str, Any]], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The embedding model (name, pretrained tag, weights digest) and every weights digest the
    stages' fingerprints record."""
    embed = (fps.get("embed") or {}).get("config", {})
    weights = _weights(fps, run_config)
    # the text tower's tokenizer: recorded by the stage that scores captions against images
    text = next((fp.get("config", {}) for fp in fps.values()
                 if isinstance(fp.get("config"), Mapping) and "tokenizer" in fp["config"]), {})
    return {
        "embedding": {
            "model": embed.get("model", run_config.get("model")),
            "pretrained": run_config.get("pretrained"),
            "model_dir": run_config.get("model_dir"),
            "embed_dim": embed.get("embed_dim"),
            "weights_digest": embed.get("weights_digest"),
            "source": "embed/_stage.json (model, weights_digest, embed_dim); _summary.json config (pretrained)",
        },
        "text_tokenizer": text.get("tokenizer"),
        "weights": weights,
        "random_weights": any(w["random"] for w in weights),
        "allow_random_weights": bool(run_config.get("allow_random_weights", False)),
    }


def _resize_words(pre: Mapping[str, Any]) -> str | None:
    size = pre.get("size")
    if not (isinstance(size, list) and len(size) == 2):
        return None
    words = _RESIZE_WORDS.get(str(pre.get("resize_mode")), "resize mode {mode} to {h}x{w}")
    return words.format(h=size[0], w=size[1], fill=pre.get("fill_color"), mode=pre.get("resize_mode"))


def _preprocessing(fps: Mapping[str, dict[str, Any]], run_config: Mapping[str, Any]) -> dict[str, Any]:
    embed = (fps.get("embed") or {}).get("config", {})
    pre = dict(embed.get("preprocess") or {})
    # a second image model embed runs on the same decoded images (the watermark detector)
    watermark = next((v for v in embed.values() if isinstance(v, Mapping) and "weights_digest" in v), None)
    return {
        "image": {**pre, "resize": _resize_words(pre)} if pre else None,
        "precision": embed.get("precision"),
        "max_pixels": embed.get("max_pixels"),
        "decoder": run_config.get("decode_backend"),
        "skipped_before_decode": embed.get("before_decode"),
        "watermark_detector": dict(watermark.get("preprocess") or {}) if watermark else None,
        "source": "embed/_stage.json (preprocess, precision, max_pixels); _summary.json config (decode_backend: "
                  "which decoder does not change the embedding beyond rounding, so it is no fingerprint key)",
    }


def _filters(store: CommitStore, summary: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """One entry per declared filter: the threshold the run used (the committed thresholds file,
    checked against the thresholds step's fingerprint) and how it was chosen, with what it dropped."""
    from winnow.filters import FILTERS
    from winnow.stages.thresholds import STAGE, THRESHOLDS_FILE, committed

    data = committed(store)
    stored = (data or {}).get("filters", {})
    source = f"{STAGE}/{THRESHOLDS_FILE}" if data is not None else None
    sharing: dict[str, list[str]] = {}
    for f in FILTERS:
        sharing.setdefault(f.count, []).append(f.name)
    out = []
    for f in FILTERS:
        entry = stored.get(f.name)
        item: dict[str, Any] = {
            "name": f.name, "label": f.label, "stage": f.stage, "keep": f.keep, "before_decode": f.before_decode,
            "outcome": f.outcome, "count": f.count, "dropped": summary.get(f.count),
            "count_shared_with": [n for n in sharing[f.count] if n != f.name],
        }
        if f.missing is not None:
            item["missing"] = {"outcome": f.missing.outcome, "count": f.missing.count,
                               "dropped": summary.get(f.missing.count)}
        if entry is None:
            item.update(recorded=False, enabled=None, threshold=None, chosen_by=None)
        else:
            fraction = entry.get("keep_fraction")
            item.update(recorded=True, enabled=bool(entry.get("enabled", True)), threshold=entry.get("threshold"),
                        param=entry.get("source"), absolute=entry.get("absolute"), keep_fraction=fraction,
                        chosen_by="keep_fraction" if fraction is not None else "threshold")
            if fraction is not None:
                item.update(scored=entry.get("scored"), keep_count=entry.get("keep_count"))
        out.append(item)
    known = {f.name for f in FILTERS}
    for name in sorted(set(stored) - known):  # a filter of a package no longer installed
        entry = stored[name]
        out.append({"name": name, "declared": False, "recorded": True, "enabled": bool(entry.get("enabled", True)),
                    "threshold": entry.get("threshold"), "keep": entry.get("keep"), "param": entry.get("source"),
                    "keep_fraction": entry.get("keep_fraction"),
                    "chosen_by": "keep_fraction" if entry.get("keep_fraction") is not None else "threshold"})
    return out, source


def _dedup(store: CommitStore, fps: Mapping[str, dict[str, Any]], run_config: Mapping[str, Any],
           summary: Mapping[str, Any]) -> dict[str, Any]:
    from winnow.stages.dedup_steps import centroids_committed

    configured = {k: run_config.get(k) for k in ("dedup_eps", "dedup_clusters", "dedup_sample_size", "dedup_buckets")}
    steps = {name: fp.get("config", {}) for name, fp in fps.items() if name in ("centroids", "pairwise")}
    digest = (fps.get("centroids") or {}).get("digest")
    meta = centroids_committed(store, digest) if digest else None
    used = None if meta is None else {k: meta.get(k) for k in ("k", "candidates", "sample", "buckets")}
    return {
        "method": "SemDeDup: spherical k-means on the embeddings of the records every filter kept, then within each "
                  "cluster a record is a near duplicate at cosine similarity >= 1 - eps to a higher-ranked one",
        "configured": configured,
        "fingerprinted": steps,
        "used": used,
        "duplicates": summary.get("duplicates"),
        "exact_duplicates": summary.get("exact_duplicates"),
        "source": "_summary.json config; centroids/_stage.json, pairwise/_stage.json; centroids/centroids.parquet "
                  "metadata (k, candidates, sample, buckets used)",
    }


def _sources(index_meta: Mapping[str, Any] | None, fps: Mapping[str, dict[str, Any]],
             summary: Mapping[str, Any]) -> dict[str, Any]:
    meta = index_meta or {}
    shards = list(meta.get("shards") or [])
    counts = meta.get("counts") or {}
    index_cfg = (fps.get("index") or {}).get("config", {})
    size = counts.get("bytes")
    return {
        "input_uri": meta.get("input_uri", (summary.get("config") or {}).get("input_uri")),
        "shards": len(shards) if shards else summary.get("shards"),
        "shard_uris": shards[:MAX_SHARDS_LISTED],
        "shards_not_listed": max(0, len(shards) - MAX_SHARDS_LISTED),
        "bytes": size,
        "bytes_note": None if size is not None else
        "not recorded: the index stores each shard's name, not its size (the sizes enter only the listing digest)",
        "listing_digest": index_cfg.get("shards_digest"),
        "records": meta.get("num_records"),
        "members": counts.get("members"),
        "members_without_image": counts.get("members_without_image"),
        "duplicate_keys": counts.get("duplicate_keys"),
        "bad_shards": counts.get("bad_shards"),
        "zero_byte_shards": counts.get("zero_byte_shards"),
        "caption_field": index_cfg.get("caption_field"),
        "source": "index/_index.json; index/_stage.json (listing digest, caption field)",
    }


def _counts(summary: Mapping[str, Any], corpus: bool) -> dict[str, Any]:
    from winnow.filters import count_names

    return {
        "records": summary.get("records"),
        # A list, in the order outcomes are decided (card.json's objects have sorted keys).
        "outcomes": [{"outcome": outcome, "count": name, "records": summary.get(name)}
                     for outcome, name in count_names(corpus).items()],
        "written": summary.get("written"),
        "skipped_members": summary.get("skipped_members"),
        "source": "_summary.json",
    }


def _takedown_entry(t: Mapping[str, Any], run_key: str, checked: int | None) -> dict[str, Any]:
    gen = t.get("generation")
    run_keys = list(t.get("run_keys") or [])
    return {
        "id": t.get("id"), "generation": gen, "date": t.get("date"), "reason": t.get("reason"),
        "identifiers": t.get("identifiers"), "removed": t.get("removed"),
        "in_force_at_check": checked is not None and isinstance(gen, int) and gen <= checked,
        "removed_from_this_run": run_key in run_keys,
    }


def _corpus_parts(store: CommitStore, root: RunRoot, run_key: str, summary: Mapping[str, Any]
                  ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The corpus section (None without a corpus) and the takedowns section of the run's card."""
    from winnow.stages.corpus_matches import CHECKED_DONE, PRE_DONE

    uri = run_corpus_uri(root)
    if uri is None:
        return None, {"applied": False, "records_dropped": 0, "takedowns": [],
                      "note": "the run has no corpus (corpus_uri unset): no takedown list was applied"}
    check = read_json(store.fs, store.path(CHECKED_DONE)) or read_json(store.fs, store.path(PRE_DONE)) or {}
    checked = check.get("generation") if isinstance(check.get("generation"), int) else None
    takedowns = {
        "applied": True,
        "records_dropped": summary.get("takedowns"),
        "checked_against_generation": checked,
        "check_record": CHECKED_DONE if read_json(store.fs, store.path(CHECKED_DONE)) else PRE_DONE,
        "takedowns": [],
        "source": "_summary.json (takedowns), the run's corpus check record, the corpus head's takedowns",
    }
    from winnow.exceptions import WinnowError

    try:
        corpus = build_corpus_card(uri, root.storage)
    except (WinnowError, OSError) as exc:  # the card is written all the same, saying so
        takedowns["note"] = f"the corpus could not be read: {exc}"
        return {"corpus_uri": uri, "error": str(exc)}, takedowns
    takedowns["takedowns"] = [_takedown_entry(t, run_key, checked) for t in corpus["takedowns"]]
    mine = next((r for r in corpus["runs"] if r["run_key"] == run_key), None)
    corpus["this_run"] = {"published": mine is not None, "generation": mine["generation"] if mine else None,
                          "logical_date": mine["logical_date"] if mine else None,
                          "records_added": mine["records"] if mine else None,
                          "left_out_at_publish": mine["left_out"] if mine else None}
    return corpus, takedowns


def _open_corpus(corpus: Any, storage: Any = None) -> Any:
    """A :class:`winnow.corpus.Corpus` as given, or the one at a URI."""
    from winnow.corpus import open_corpus

    return open_corpus(corpus, storage) if isinstance(corpus, str) else corpus


def build_corpus_card(corpus: Any, storage: Any = None) -> dict[str, Any]:
    """The card of a corpus (a :class:`winnow.corpus.Corpus`, or its URI reached with
    ``storage``), from its head alone: its runs in generation order (with their counts), its
    totals and its takedowns."""
    corpus = _open_corpus(corpus, storage)
    head = corpus.head()

    def gen(x: Mapping[str, Any]) -> int:
        g = x.get("generation")
        return g if isinstance(g, int) else 0

    runs = []
    for r in sorted(head.runs, key=gen):
        counts = r.get("counts") if isinstance(r.get("counts"), Mapping) else {}
        runs.append({"run_key": r.get("run_key"), "logical_date": r.get("logical_date"), "generation": r.get("generation"),
                     "run_root": r.get("run_root"), "published_at": r.get("published_at"),
                     "records": int(r.get("records") or 0), "left_out": int(r.get("taken_down") or 0),
                     "counts": {k: counts[k] for k in RUN_COUNTS if k in counts}})
    raw = sorted(head.takedowns, key=gen)
    published = sum(r["records"] for r in runs)
    taken_down = sum(int(t.get("removed") or 0) for t in raw)
    return {
        "corpus_uri": corpus.root.uri,
        "generation": head.generation,
        "embed_fingerprint": head.embed_fingerprint,
        "records": published - taken_down,
        "published_records": published,
        "taken_down": taken_down,
        "runs": runs,
        "takedowns": [{k: t.get(k) for k in ("id", "generation", "date", "reason", "identifiers", "removed", "run_keys",
                                             "files_rewritten")} for t in raw],
        "source": "_corpus.json (the corpus head)",
    }


def summary_count(counts: Mapping[str, Any], outcome: str) -> Any:
    """The card's count of records with ``outcome``."""
    return next((o["records"] for o in counts["outcomes"] if o["outcome"] == outcome), None)


def _filled(section: str, field: str, value: Any, source: str) -> dict[str, Any]:
    return {"section": section, "field": field, "status": "filled by the curation run", "value": value, "source": source}


def _owner(section: str, field: str, hint: str | None = None) -> dict[str, Any]:
    return {"section": section, "field": field, "status": OWNER, "value": None, "source": None,
            **({"hint": hint} if hint else {})}


def _eu_ai_act(card: Mapping[str, Any]) -> dict[str, Any]:
    """The template's fields: those a curation run can fill, each with its source; the rest the
    dataset owner's."""
    src, counts, filters = card["sources"], card["counts"], card["filters"]
    on = [f for f in filters if f.get("enabled")]
    filter_words = "; ".join(
        f"{f['name']} ({f['label']} {f['keep']} {_num(f['threshold'])}"
        + (f", chosen by keep_fraction {_num(f['keep_fraction'])}" if f.get("chosen_by") == "keep_fraction" else "")
        + f"): {_num(f.get('dropped'))} dropped" for f in on if f.get("declared", True))
    td = card["takedowns"]
    if td["applied"]:
        optout = (f"{_num(td['records_dropped'])} records dropped before decode because a takedown of corpus "
                  f"{card['corpus']['corpus_uri']} lists them (checked against corpus generation "
                  f"{_num(td.get('checked_against_generation'))}; {len(td['takedowns'])} takedowns recorded); a "
                  "takedown stays in force: no later run lets a listed record in")
        optout_src = "_summary.json (takedowns); " + td["check_record"] + "; the corpus head _corpus.json"
    else:
        optout = "none applied by this run: it has no corpus, so no takedown list was checked"
        optout_src = "_summary.json config (corpus_uri unset)"
    dedup = card["dedup"]
    fields = [
        _owner("1.1", "Provider name and contact details"),
        _owner("1.2", "Model name(s), version(s) and dependencies"),
        _owner("1.2", "Date of placement of the model on the Union market"),
        _filled("1.3", "Modalities", "image, with text captions where records have them (.txt, or the "
                f"{src.get('caption_field')!r} field of the .json sidecar)", "winnow curates WebDataset image records; "
                "index/_stage.json (caption_field)"),
        _filled("1.3", "Training data size (this dataset)",
                f"{_num(summary_count(counts, 'kept'))} image records kept of {_num(counts['records'])} indexed "
                f"from {_num(src['shards'])} shards ({_num(counts['written'])} written)"
                + ("" if src["bytes"] is None else f", input {_num(src['bytes'])} bytes"),
                "_summary.json (kept, records, written); index/_index.json (shards)"),
        _owner("1.3", "Types of content and other characteristics of the data (languages, domains)"),
        _filled("1.3", "Latest date of data collection", card["run"]["logical_date"],
                card["run"]["logical_date_source"]) if card["run"]["logical_date"] else
        _owner("1.3", "Latest date of data collection", "not recorded in the run root (a run with a corpus records its "
               "logical date at publish)"),
        _filled("2", "Data sources used by this run (input locations)",
                {"input_uri": src["input_uri"], "shards": src["shards"], "shard_uris": src["shard_uris"]},
                "index/_index.json"),
        _owner("2.1", "Publicly available datasets used (names, links)"),
        _owner("2.2", "Private datasets licensed from rightsholders or obtained from other third parties"),
        _owner("2.3", "Data crawled and scraped from online sources (crawlers, collection period, top domain names)"),
        _owner("2.4", "User data"),
        _owner("2.5", "Synthetic data"),
        _owner("2.6", "Other sources of data"),
        _filled("3.1", "Respect of reservations of rights / opt-outs: takedown handling in this dataset", optout,
                optout_src),
        _owner("3.1", "Measures to respect text-and-data-mining opt-outs at collection time (robots.txt, machine-"
               "readable reservations) and the complaint mechanism"),
        _filled("3.2", "Content filters applied (the owner says whether and how they address illegal content)",
                "; ".join(f"{f['name']}: kept {f['label']} {f['keep']} {_num(f['threshold'])}, "
                          f"{_num(f.get('dropped'))} dropped" for f in on) or "no filter on",
                "thresholds/thresholds.json; _summary.json"),
        _owner("3.2", "Measures to remove illegal content (beyond the filters above)"),
        _filled("3.3", "Other data processing: filters and deduplication",
                f"filters: {filter_words or 'none on'}; near-duplicate removal (eps {_num(dedup['configured'].get('dedup_eps'))}): "
                f"{_num(dedup['duplicates'])} dropped; exact duplicates (same image bytes): "
                f"{_num(dedup['exact_duplicates'])} dropped",
                "thresholds/thresholds.json; _summary.json; centroids/_stage.json, pairwise/_stage.json"),
    ]
    return {"template": TEMPLATE, "fields": fields,
            "note": "The template describes a model's training content; this card fills the fields one curation run "
                    "can state about the dataset it produced. The dataset owner fills the rest (and checks the "
                    "current version of the template)."}


def build_card(root: RunRoot | str) -> dict[str, Any]:
    """The card of the run at ``root``, from its storage (see the module doc). Raises a
    :class:`~winnow.exceptions.StorageError` when the run has no ``_summary.json`` (no report yet)."""
    from winnow.exceptions import StorageError
    from winnow.rowgroups.store import SUMMARY_FILE
    from winnow.runkey import run_key_of

    root = root if isinstance(root, RunRoot) else RunRoot(root)
    store = CommitStore(root)
    summary = read_json(store.fs, store.path(SUMMARY_FILE))
    if summary is None:
        raise StorageError(f"{store.path(SUMMARY_FILE)} is missing: the card is written by the report step, "
                           "after the run's summary")
    run_config = summary.get("config") or {}
    run_key = run_config.get("run_key") or run_key_of(root.uri)
    fps = _fingerprints(store)
    index_meta = read_json(store.fs, store.path("index", "_index.json"))
    filters, thresholds_source = _filters(store, summary)
    corpus, takedowns = _corpus_parts(store, root, run_key, summary)
    logical = (corpus or {}).get("this_run", {}).get("logical_date") if corpus else None
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "run": {
            "run_key": run_key,
            "run_root": summary.get("run_root", root.uri),
            "write_dir": summary.get("write_dir"),
            "logical_date": logical,
            "logical_date_source": "the corpus head's record of this run's publish" if logical else None,
            "winnow": winnow_version(),
        },
        "sources": _sources(index_meta, fps, summary),
        "models": _models(fps, run_config),
        "preprocessing": _preprocessing(fps, run_config),
        "filters": filters,
        "thresholds_source": thresholds_source,
        "dedup": _dedup(store, fps, run_config, summary),
        "counts": _counts(summary, corpus is not None),
        "takedowns": takedowns,
        "corpus": corpus,
        "provenance": {
            "files": [SUMMARY_FILE, "index/_index.json", *(f"{s}/_stage.json" for s in fps),
                      *([thresholds_source] if thresholds_source else [])],
            "fingerprints": {name: fp.get("digest") for name, fp in fps.items()},
        },
    }
    card["eu_ai_act"] = _eu_ai_act(card)
    return card


# ---- CARD.md ------------------------------------------------------------------------------------

def _num(v: Any) -> str:
    """A value as the card's markdown shows it: numbers exactly as JSON writes them."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    return str(v)


def _cell(v: Any) -> str:
    return _num(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _chosen(f: Mapping[str, Any]) -> str:
    if not f.get("recorded"):
        return "not recorded by this run"
    if not f.get("enabled"):
        return f"off ({f.get('param')} = {_num(f.get('absolute'))})"
    if f.get("chosen_by") == "keep_fraction":
        extra = f", keeps {_num(f.get('keep_count'))} of {_num(f.get('scored'))} scored" if f.get("scored") is not None else ""
        return f"chosen by keep_fraction: {f.get('param')} = {_num(f.get('keep_fraction'))} -> computed{extra}"
    return f"fixed threshold ({f.get('param')})"


def card_markdown(card: Mapping[str, Any]) -> str:
    """``CARD.md``: the card for people."""
    run, src, models, pre = card["run"], card["sources"], card["models"], card["preprocessing"]
    lines = [f"# Dataset card: run `{run['run_key']}`", "",
             f"Curated by winnow {run['winnow']['version']} ({run['winnow']['source']}). "
             f"Run root `{run['run_root']}`, output `{run['write_dir']}`; logical date: "
             f"{run['logical_date'] or 'not recorded'}.",
             "Rebuilt from the run's storage by its report step (`_summary.json`, `thresholds/thresholds.json`, "
             "each stage's `_stage.json`, `index/_index.json`); `card.json` holds the same, as data.", ""]
    if models["random_weights"]:
        lines += ["**Random weights**: this run scored with random model weights (`allow_random_weights`); its scores "
                  "and the filters' decisions mean nothing. A test or demo run.", ""]
    lines += ["## Sources", ""]
    shards = ", ".join(f"`{s}`" for s in src["shard_uris"]) + (
        f" and {src['shards_not_listed']} more (all in `index/_index.json`)" if src["shards_not_listed"] else "")
    lines += _table(["", ""], [
        ["input", f"`{src['input_uri']}`"], ["shards", src["shards"]], ["shard files", shards or "–"],
        ["bytes", src["bytes"] if src["bytes"] is not None else src["bytes_note"]],
        ["listing digest", src["listing_digest"]], ["records indexed", src["records"]],
        ["members without image", src["members_without_image"]], ["duplicate keys", src["duplicate_keys"]],
        ["bad shards", src["bad_shards"]], ["zero-byte shards", src["zero_byte_shards"]]])
    emb = models["embedding"]
    lines += ["## Models and weights", "",
              f"Embedding model `{emb['model']}`, pretrained tag `{emb['pretrained']}`"
              + (f", model dir `{emb['model_dir']}`" if emb["model_dir"] else "")
              + f", embedding width {_num(emb['embed_dim'])}.", ""]
    lines += _table(["stage", "model", "weights digest", "weights file"],
                    [[w["stage"] if w["name"] == w["stage"] else f"{w['stage']} ({w['name']})",
                      w["model"] or w["name"], f"`{w['weights_digest']}`", w["weights_file"]] for w in models["weights"]])
    image = pre["image"] or {}
    lines += ["## Preprocessing", ""]
    lines += _table(["", ""], [
        ["resize / crop", image.get("resize")], ["size", image.get("size")], ["interpolation", image.get("interpolation")],
        ["normalisation mean / std", f"{image.get('mean')} / {image.get('std')}"], ["precision", pre["precision"]],
        ["max pixels (decompression-bomb guard)", pre["max_pixels"]], ["decoder", pre["decoder"]],
        ["filters applied before decode", pre["skipped_before_decode"] or "none"]])
    lines += ["## Filters", "",
              f"Every filter of `winnow.filters.FILTERS`, with the threshold the run used (`{card['thresholds_source']}`)"
              " and how it was chosen. A record is kept when `value <keep> threshold`.", ""]
    lines += _table(["filter", "value", "keep", "threshold", "chosen", "dropped"],
                    [[f["name"], f.get("label"), f.get("keep"), f["threshold"] if f.get("enabled") else "–", _chosen(f),
                      (f"{_num(f.get('dropped'))} (`{f.get('count')}`"
                       + (f", shared with {', '.join(f['count_shared_with'])}" if f.get("count_shared_with") else "")
                       + ")" + (f"; {_num(f['missing']['dropped'])} `{f['missing']['count']}`" if f.get("missing") else ""))
                      if f.get("enabled") else "–"] for f in card["filters"]])
    d = card["dedup"]
    used = d["used"] or {}
    lines += ["## Dedup", "", d["method"] + ".", ""]
    lines += _table(["", ""], [
        ["eps", d["configured"].get("dedup_eps")],
        ["clusters", f"{_num(d['configured'].get('dedup_clusters'))} configured (0 = automatic), {_num(used.get('k'))} used"],
        ["k-means sample", f"{_num(d['configured'].get('dedup_sample_size'))} configured, {_num(used.get('sample'))} used "
                           f"of {_num(used.get('candidates'))} candidates"],
        ["pairwise buckets", f"{_num(d['configured'].get('dedup_buckets'))} configured, {_num(used.get('buckets'))} used"],
        ["near duplicates dropped", d["duplicates"]], ["exact duplicates dropped", d["exact_duplicates"]]])
    c = card["counts"]
    lines += ["## Counts", "", f"{_num(c['records'])} records indexed; each has one outcome (`_summary.json`).", ""]
    lines += _table(["outcome", "count", "records"],
                    [[o["outcome"], f"`{o['count']}`", o["records"]] for o in c["outcomes"]]
                    + [["written", "`written`", c["written"]]])
    td = card["takedowns"]
    lines += ["## Takedowns", ""]
    if not td["applied"]:
        lines += ["None: " + td["note"] + ".", ""]
    else:
        lines += [f"{_num(td['records_dropped'])} records of this run dropped as listed by a takedown (checked against "
                  f"corpus generation {_num(td.get('checked_against_generation'))}).", ""]
        if td.get("note"):
            lines += [td["note"], ""]
        if td["takedowns"]:
            lines += _table(["generation", "date", "reason", "identifiers", "removed", "in force at the run's check",
                             "removed records of this run"],
                            [[t["generation"], t["date"], t["reason"], t["identifiers"], t["removed"],
                              t["in_force_at_check"], t["removed_from_this_run"]] for t in td["takedowns"]])
    corpus = card["corpus"]
    if corpus is not None:
        lines += ["## Corpus", ""]
        if corpus.get("error"):
            lines += [f"Corpus `{corpus['corpus_uri']}` could not be read: {corpus['error']}", ""]
        else:
            lines += _corpus_lines(corpus, this_run=run["run_key"])
    lines += ["## EU AI Act: public summary of training content", "", f"Template: {card['eu_ai_act']['template']}. "
              + card["eu_ai_act"]["note"], ""]
    lines += _table(["section", "field", "value", "source"],
                    [[f["section"], f["field"], _md_value(f["value"]) if f["value"] is not None else f"_{f['status']}_",
                      f["source"] or "–"] for f in card["eu_ai_act"]["fields"]])
    return "\n".join(lines).rstrip() + "\n"


def _md_value(v: Any) -> str:
    if isinstance(v, Mapping):
        return "; ".join(f"{k}: {_num(x) if not isinstance(x, list) else ', '.join(map(str, x))}" for k, x in v.items())
    return _num(v)


def _corpus_lines(corpus: Mapping[str, Any], this_run: str | None = None) -> list[str]:
    lines = [f"Corpus `{corpus['corpus_uri']}` at generation {_num(corpus['generation'])}: {_num(corpus['records'])} "
             f"records ({_num(corpus['published_records'])} published by {len(corpus['runs'])} runs, "
             f"{_num(corpus['taken_down'])} taken down by {len(corpus['takedowns'])} takedowns).", ""]
    me = corpus.get("this_run")
    if this_run is not None and me is not None:
        lines += [f"This run published as generation {_num(me['generation'])}." if me["published"] else
                  "This run had not published to the corpus when this card was written.", ""]
    lines += _table(["generation", "run key", "logical date", "records added", "left out", "published at"],
                    [[r["generation"], r["run_key"] + (" (this run)" if r["run_key"] == this_run else ""),
                      r["logical_date"], r["records"], r["left_out"], r["published_at"]] for r in corpus["runs"]])
    if corpus["takedowns"]:
        lines += _table(["generation", "date", "reason", "identifiers", "removed", "from runs"],
                        [[t["generation"], t["date"], t["reason"], t["identifiers"], t["removed"],
                          ", ".join(t.get("run_keys") or [])] for t in corpus["takedowns"]])
    return lines


def corpus_card_markdown(card: Mapping[str, Any]) -> str:
    return "\n".join([f"# Corpus card: `{card['corpus_uri']}`", "",
                      "Rebuilt from the corpus head (`_corpus.json`) by winnow.", "", *_corpus_lines(card)]).rstrip() + "\n"


# ---- writing and reading ------------------------------------------------------------------------

def write_card(root: RunRoot | str) -> dict[str, Any]:
    """Build the run's card from storage and write ``card.json`` and ``CARD.md`` in its run root
    (beside ``_summary.json``); returns the card."""
    root = root if isinstance(root, RunRoot) else RunRoot(root)
    store = CommitStore(root)
    card = build_card(root)
    write_json(store.fs, store.path(CARD_FILE), card)
    write_atomic(store.fs, store.path(CARD_MD), card_markdown(card).encode("utf-8"))
    return card


#: Rebuilds of the corpus card when the head moved on while it was written.
CORPUS_CARD_TRIES = 5


def write_corpus_card(corpus: Any, storage: Any = None) -> dict[str, Any]:
    """Write ``<corpus>/card.json`` and ``CARD.md`` from the corpus head (a
    :class:`winnow.corpus.Corpus`, or its URI reached with ``storage``); returns the card. The
    publish and takedown steps call it once their commit is in. Two writers after two commits
    may finish in either order, so each reads the head again after writing and rebuilds while
    it moved on: the card left in storage is the newest head's."""
    corpus = _open_corpus(corpus, storage)
    for _ in range(CORPUS_CARD_TRIES):
        card = build_corpus_card(corpus)
        write_json(corpus.fs, corpus.path(CARD_FILE), card)
        write_atomic(corpus.fs, corpus.path(CARD_MD), corpus_card_markdown(card).encode("utf-8"))
        if corpus.head().generation == card["generation"]:
            break
    return card


def read_card(root: RunRoot) -> dict[str, Any] | None:
    """The run's card for the curation view: ``{"card", "markdown", "stored"}``: the stored
    ``card.json`` and ``CARD.md`` when the report wrote them; else built now from storage (a run
    reported before cards existed; nothing is written); None when the run has no summary yet."""
    from winnow.rowgroups.fs import read_small
    from winnow.rowgroups.store import SUMMARY_FILE

    store = CommitStore(root)
    card = read_json(store.fs, store.path(CARD_FILE))
    if card is not None:
        md = read_small(store.fs, store.path(CARD_MD))
        return {"card": card, "markdown": md.decode("utf-8") if md is not None else card_markdown(card), "stored": True}
    if read_json(store.fs, store.path(SUMMARY_FILE)) is None:
        return None
    card = build_card(root)
    return {"card": card, "markdown": card_markdown(card), "stored": False}


__all__ = ["CARD_FILE", "CARD_FORMAT", "CARD_MD", "build_card", "build_corpus_card", "card_markdown",
           "corpus_card_markdown", "read_card", "recorded_weights", "write_card", "write_corpus_card"]


#: The counts of a published run the view lists (the run's summary counts, as the corpus head
#: recorded them at publish).
RUN_COUNTS = ("records", "kept", "corpus_duplicates", "takedowns", "exact_duplicates", "duplicates", "written")


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def run_corpus_uri(run_root: RunRoot, conf: Mapping[str, Any] | None = None) -> str | None:
    """The corpus the run at ``run_root`` builds, None for a run without one.

    The run root's own record first (what the run really used): its corpus pre-check's
    ``corpus/_pre.json`` (written before anything is decoded), else the ``config`` of its
    ``_summary.json``; else the DAG run's ``conf`` (``corpus_uri``; blank or absent: none)."""
    from winnow.rowgroups.store import SUMMARY_FILE, CommitStore, read_json
    from winnow.stages.corpus_matches import PRE_DONE

    store = CommitStore(run_root)

    def record(rel: str) -> Any:
        try:
            return read_json(store.fs, store.path(rel))
        except ValueError:  # damaged: as if the run had not written it
            return None

    pre = record(PRE_DONE)
    if isinstance(pre, dict) and _text(pre.get("corpus_uri")):
        return _text(pre["corpus_uri"])
    summary = record(SUMMARY_FILE)
    config = summary.get("config") if isinstance(summary, dict) else None
    if isinstance(config, dict) and "corpus_uri" in config:
        return _text(config["corpus_uri"])
    return _text((conf or {}).get("corpus_uri"))
