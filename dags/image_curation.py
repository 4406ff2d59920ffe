"""The production curation DAG: index -> corpus_pre -> per-partition embed/aesthetic/nsfw/clip_score
-> corpus_check -> thresholds -> dedup (centroids -> per-partition assign -> per-bucket pairwise ->
per-partition flags) -> corpus_near -> status -> write -> publish -> report. The four corpus tasks
do nothing for a run without ``corpus_uri``; with one, ``corpus_check`` waits for the previous
date to publish.

Parses fast and touches neither storage nor Ray: the engine is imported inside the operators.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, Asset, Param, chain, task_group

from winnow.checks import DEFAULT_MAX_PARTITIONS, MAX_MAP_LENGTH
from winnow.filters import PARAMS as FILTER_PARAMS
from winnow.registry import run_phases
from winnow.runkey import PATTERN as RUN_KEY_PATTERN
from winnow_airflow.base import PARTITION_LABEL
from winnow_airflow.corpus import CORPUS_OPERATORS, CORPUS_STEPS
from winnow_airflow.links import DAG_ID
from winnow_airflow.stages import BUCKET_LABEL, OPERATORS, ReportOperator

CURATED_IMAGES = Asset(name="winnow_curated_images", uri="winnow://image_curation/write", group="winnow")
CURATION_SUMMARY = Asset(name="winnow_curation_summary", uri="winnow://image_curation/summary", group="winnow")

DOC_MD = """
# Image curation

Curates WebDataset shards: exact duplicates dropped by their bytes, image size and caption
length filters (from the headers and sidecars, before any decode), CLIP embeddings, LAION
aesthetic and NSFW filters, a CLIP score filter (caption vs image), semantic dedup, then writes
the kept images (original bytes) as WebDataset tars plus Parquet, and one status row per input
record (`status/`: outcome, reason, scores), under `<output_root>/<run_key>/`. Work is done per **row group** (`buffer_size` records) and committed
per row group; a **partition** (a range of row groups) is one mapped task instance, labelled
with its row-group range. Committed row groups are never computed again.

## Params
| param | meaning |
|---|---|
| `input_uri` | shard folder, glob or URI; may hold `{{ ds }}` (e.g. `s3://bucket/shards/{{ ds }}/`) |
| `output_root`, `run_key` | the run root is `<output_root>/<run_key>`; an empty run key is the logical date (`YYYYMMDD`), or the run id for a manual run without one |
| `buffer_size`, `max_partitions` | records per row group; most mapped task instances per stage (<= MAX_MAP_LENGTH, Airflow's max_map_length) |
| `model`, `pretrained`, `model_dir` | open_clip model, its weights tag or file, where weight files live |
| `aesthetic_weights`, `nsfw_weights` | head weight files (the LAION heads expect ViT-L/14 OpenAI embeddings) |
| `watermark_weights` | LAION watermark detector weights file, loaded by the embed stage while the watermark filter is on |
FILTER_ROWS
| `caption_field` | the `.json` sidecar field read as the caption when a record has no `.txt` |
| `dedup_eps`, `dedup_clusters` | near-duplicates have cosine similarity >= 1 - eps, eps in (0, 1]; k-means clusters (0: automatic) |
| `decode_backend`, `batch_size` | image decoder (`auto`, `nvimgcodec`, `dali-gpu`, `dali-cpu`, `pillow`); images per embed model call |
| `dedup_sample_size`, `dedup_buckets` | rows k-means clusters (0: min(all, 100 x k)); buckets of clusters the pairwise task is mapped over (0: one per ~65k kept records, at most MAX_MAP_LENGTH) |
| `allow_random_weights` | only for tests and demos: allow a model with random weights |
| `overwrite` | a stage whose config changed is moved aside (`<stage>.replaced-<time>`) and recomputed with the stages after it |
| `skip_bad_shards` | index what can be read and record unreadable shards instead of failing |
| `ray_conn_id` | Airflow connection of type `ray`; none by that id means an embedded local Ray |
| `storage_conn_id` | Airflow connection of type `aws` for `s3://` input and output (login/password = key id/secret, extras `endpoint_url`, `region_name`); empty: the `AWS_*` environment variables |
| `corpus_uri` | the corpus: the one curated dataset this DAG's runs build over time (local path, `s3://`, `gs://`); empty: the run stands alone (see Corpus) |
| `url_field` | the `.json` sidecar field holding a record's source URL (the corpus manifest's `url`, what a takedown by URL matches) |

The filter params (thresholds and keep fractions) come from the filter declarations
(`winnow.filters.FILTERS`): a filter declared there is a param here.

Changing a model or eps on an existing run key fails fast with the changed keys named; pick a new
run key or set `overwrite`. Thresholds and keep fractions are applied after the scores: with
`overwrite`, changing one recomputes only thresholds, dedup, status and write, never a score.

## A failed partition
Row-group failures are isolated: the others in the partition commit, then the task fails naming
the failed row groups and the first error. Retries (with exponential backoff) compute only those.
After the retries, fix the cause and clear the failed mapped instance (Grid view -> the task ->
the map index -> Clear, "only failed"), or:

    airflow tasks clear image_curation --only-failed --dag-regex image_curation -s <date> -e <date> -y

or `POST /api/v2/dags/image_curation/clearTaskInstances` with `only_failed: true`. Only the
failed row groups run again; the run then continues to dedup, write and report.

## Backfill
    airflow backfill create --dag-id image_curation --from-date 2025-01-01 --to-date 2025-01-31 \\
        --reprocess-behavior failed --dag-run-conf '{"output_root": "s3://bucket/curated"}'

Each date is its own run key (`YYYYMMDD`); runs that succeeded are left alone and failed ones
resume from what storage holds.

## Corpus
With `corpus_uri` set, the runs of this DAG build one dataset: each run's kept records join the
corpus, and a later run drops a record whose image bytes equal a corpus record's, or whose
embedding is within `dedup_eps` of one, as outcome `corpus_duplicate` (its status row names the
earlier run key, key and uid), and a record a takedown lists (see the `image_takedown` DAG) as
`takedown`. Four tasks do it, and do nothing without a corpus: `corpus_pre` (after `index`:
takedowns and byte-identical copies, never decoded), `corpus_check` (after the score stages,
before `thresholds`: the same against the corpus once the previous date published; what it finds
counts for nothing in the thresholds and the run's own dedup), `corpus_near` (after the run's own
dedup: near duplicates of corpus records) and `publish` (after `write`: the run's kept records
join the corpus in one atomic step; a rerun publishes nothing twice; an asset event on the corpus
asset, through the alias `winnow_corpus`, carries the run key, generation and record count).

Runs publish in logical-date order, so a backfill that runs dates side by side builds the corpus
that running them one after another builds. Only `corpus_check` (and what follows it) waits: the
index and the score stages (embed, aesthetic, nsfw, clip_score) of later dates run meanwhile. While a date waits, its
`corpus_check` task is **deferred** (purple in the grid; it holds no worker slot) and its log says

    waiting for run 20250301 (logical date 2025-03-01) to publish to corpus s3://bucket/corpus; this run's corpus check runs after it

again at most once a minute, until the previous date (the previous DAG run by logical date, when
its conf names the same corpus) has published. A previous date that failed before publishing
keeps the next one waiting until it is cleared and publishes: clear its failed tasks (see A failed
partition) and the waiting dates go on by themselves. A run without a logical date waits for
nothing. A month's backfill, four dates at a time:

    airflow backfill create --dag-id image_curation --from-date 2025-03-01 --to-date 2025-03-31 \\
        --max-active-runs 4 --dag-run-conf '{"corpus_uri": "s3://bucket/corpus", "output_root": "s3://bucket/curated", "input_uri": "s3://bucket/shards/{{ ds }}/"}'

(`{{ ds }}` in `input_uri` is rendered per run: each date reads its own shards.) Do not add
`--run-backwards`: the latest dates would hold every active slot, each waiting for an earlier
date that cannot start. The order is not
`depends_on_past`: that would make every date of every run wait for the previous date's success,
with or without a corpus. The previous run is Airflow's (the Task SDK's `get_previous_dagrun`),
whether it has published is the corpus's (its head in storage).
"""


DOC_MD = DOC_MD.replace("FILTER_ROWS\n", "".join(f"| `{p.name}` | {p.description} |\n" for p in FILTER_PARAMS))
DOC_MD = DOC_MD.replace("MAX_MAP_LENGTH", str(MAX_MAP_LENGTH))


def _nullable_string(title: str, description: str) -> Param:
    return Param(None, type=["null", "string"], title=title, description=description)


PARAMS = {
    "input_uri": Param(
        os.environ.get("WINNOW_INPUT_URI", "/data/webdataset/{{ ds }}"), type="string", minLength=1,
        title="Input shards", description="WebDataset shard folder, glob or URI (may hold {{ ds }}).",
    ),
    "output_root": Param(
        os.environ.get("WINNOW_OUTPUT_ROOT", "/data/curated"), type="string", minLength=1,
        title="Output root", description="Run roots are created under it as <output_root>/<run_key>.",
    ),
    "run_key": Param(
        None, type=["null", "string"], pattern=RUN_KEY_PATTERN.replace("+$", "*$"), title="Run key",
        description="Names the run folder. Empty: the logical date as YYYYMMDD (or the run id).",
    ),
    "buffer_size": Param(256, type="integer", minimum=1, maximum=1_000_000, title="Buffer size",
                         description="Records per row group: the unit of work, commit and retry."),
    "max_partitions": Param(DEFAULT_MAX_PARTITIONS, type="integer", minimum=1, maximum=MAX_MAP_LENGTH, title="Max partitions",
                            description=f"Most mapped task instances per stage (Airflow's max_map_length is {MAX_MAP_LENGTH})."),
    "model": Param("ViT-L-14-quickgelu", type="string", minLength=1, title="Embedding model",
                   description="open_clip model name; the LAION heads expect ViT-L-14 embeddings."),
    "pretrained": Param("openai", type="string", minLength=1, title="Pretrained weights",
                        description="open_clip pretrained tag or a local weights file."),
    "model_dir": _nullable_string("Model directory", "Folder with local weight files (no downloads)."),
    "aesthetic_weights": _nullable_string("Aesthetic head weights", "LAION improved-aesthetic MLP weights file."),
    "nsfw_weights": _nullable_string("NSFW head weights", "LAION CLIP-based NSFW detector weights file."),
    "watermark_weights": _nullable_string("Watermark detector weights",
                                          "LAION watermark detector weights file (watermark_model_v1.pt); read "
                                          "only while the watermark filter is on."),
    # One param per filter knob, as declared (range, default, title) in winnow.filters.
    **{p.name: Param(p.default, **p.json_schema(), title=p.title, description=p.description) for p in FILTER_PARAMS},
    "caption_field": Param("caption", type="string", minLength=1, title="Caption field",
                           description="Field of the .json sidecar read as the caption when there is no .txt."),
    # Ranges are those of the stage configs that own the knobs (a test keeps them equal).
    "dedup_eps": Param(0.05, type="number", exclusiveMinimum=0, maximum=1, title="Dedup epsilon",
                       description="Near-duplicates have cosine similarity >= 1 - eps."),
    "dedup_clusters": Param(0, type="integer", minimum=0, title="Dedup clusters",
                            description="k-means clusters for dedup; 0 picks a number from the data size."),
    "decode_backend": Param("auto", type="string", enum=["auto", "nvimgcodec", "dali-gpu", "dali-cpu", "pillow"],
                            title="Decode backend",
                            description="auto picks the fastest installed decoder (nvImageCodec or DALI on a GPU, else DALI-CPU or Pillow)."),
    "batch_size": Param(64, type="integer", minimum=1, maximum=4096, title="Embed batch size",
                        description="Images per model call in the embed stage."),
    "dedup_sample_size": Param(0, type="integer", minimum=0, title="Dedup k-means sample",
                               description="Kept records k-means is fitted on; 0 = min(all, 100 x clusters)."),
    "dedup_buckets": Param(0, type="integer", minimum=0, maximum=MAX_MAP_LENGTH, title="Dedup buckets",
                           description="Buckets of clusters (one mapped pairwise task each); 0 = automatic."),
    "allow_random_weights": Param(False, type="boolean", title="Allow random weights",
                                  description="Tests and demos only: run a model with random weights."),
    "overwrite": Param(False, type="boolean", title="Overwrite changed stages",
                       description="Move aside stages whose config changed and recompute them and later stages."),
    "skip_bad_shards": Param(False, type="boolean", title="Skip unreadable shards",
                             description="Index the readable shards and record the others instead of failing."),
    "ray_conn_id": Param("ray_default", type="string", minLength=1, title="Ray connection",
                         description="Airflow connection of type ray; if absent, an embedded local Ray is used."),
    "storage_conn_id": _nullable_string("Storage connection", "Airflow connection of type aws for s3:// input and "
                                        "output; empty: the AWS_* environment variables."),
    "corpus_uri": Param("", type=["null", "string"], title="Corpus",
                        description="The one dataset this DAG's runs build over time (local path, s3://, gs://): "
                                    "kept records are published to it in date order, and later runs drop its "
                                    "duplicates and its takedowns. Empty: the run stands alone."),
    "url_field": Param("url", type="string", minLength=1, title="URL field",
                       description="Field of the .json sidecar holding a record's source URL (kept in the corpus "
                                   "manifest; what a takedown by URL matches)."),
}

DEFAULT_ARGS = {
    "owner": "data-curation",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    # Downstream tasks outrank upstream ones, so a free slot goes to nsfw of partition 0 before
    # embed of partition 9: partitions finish depth-first instead of stage by stage.
    "weight_rule": "upstream",
}

def _partition_group(specs, partitions):
    """A mapped task group running ``specs`` (partition stages) depth-first for each partition."""

    @task_group(group_id=specs[0].group)
    def curate_partition(partition: int) -> None:
        chain(*[OPERATORS[spec.name](task_id=spec.name, partition=partition) for spec in specs])

    curate_partition.__doc__ = f"Depth-first per partition: its row groups go {' -> '.join(s.name for s in specs)}."
    return curate_partition.expand(partition=partitions)


with DAG(
    dag_id=DAG_ID,
    description="Curate WebDataset images: CLIP embed, score filters (aesthetic, NSFW, CLIP score), semantic dedup.",
    schedule="@daily",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    default_args=DEFAULT_ARGS,
    doc_md=DOC_MD,
    tags=["winnow", "curation"],
) as dag:
    # The stage graph is the engine's registry; this wires its phases in order: a global stage
    # is one task, partition stages are mapped over the index task's partition list (in a
    # depth-first task group where the registry names one), bucket stages over their planner's
    # bucket list. The corpus tasks (winnow_airflow.corpus.CORPUS_STEPS) go right after the
    # stage each follows.
    corpus_after = {after: task_id for task_id, after in CORPUS_STEPS}

    def corpus_step(spec) -> None:
        if spec.name in corpus_after:
            task_id = corpus_after.pop(spec.name)
            steps.append(CORPUS_OPERATORS[task_id](task_id=task_id))

    steps = []
    tasks = {}
    for scope, specs in run_phases():
        if scope == "global":
            (spec,) = specs
            tasks[spec.name] = OPERATORS[spec.name](task_id=spec.task_id)
            steps.append(tasks[spec.name])
            corpus_step(spec)
        elif scope == "bucket":
            (spec,) = specs
            steps.append(
                OPERATORS[spec.name]
                .partial(task_id=spec.task_id, map_index_template=BUCKET_LABEL)
                .expand(bucket=tasks[spec.map_over].output)
            )
        elif specs[0].group:
            steps.append(_partition_group(specs, tasks[specs[0].map_over].output))
            corpus_step(specs[-1])  # after the whole group (every partition's last stage)
        else:
            for spec in specs:  # each its own mapped task, in order
                outlets = [CURATED_IMAGES] if spec.name == "write" else []
                steps.append(
                    OPERATORS[spec.name]
                    .partial(task_id=spec.task_id, outlets=outlets, map_index_template=PARTITION_LABEL)
                    .expand(partition=tasks[spec.map_over].output)
                )
                corpus_step(spec)
    if corpus_after:  # a corpus step after a stage this loop wires inside a group or bucket phase
        raise AssertionError(f"corpus steps not placed (no single task to follow): {corpus_after}")
    steps.append(ReportOperator(task_id="report", outlets=[CURATION_SUMMARY]))
    chain(*steps)
