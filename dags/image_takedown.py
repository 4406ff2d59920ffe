"""The takedown DAG: removes the records a list names from a corpus that ``image_curation`` builds.

Manual trigger only; one task (``winnow_airflow.corpus.TakedownOperator``) calls
``winnow.corpus.takedown``. Parses fast: the engine is imported inside the operator.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from winnow_airflow.corpus import TakedownOperator

DAG_ID = "image_takedown"

DOC_MD = """
# Image takedown

Removes records from a **corpus** (the dataset that `image_curation` runs build with
`corpus_uri`): an opt-out, a legal notice, a safety organisation's list. Every corpus record
that an identifier of the list matches is removed: only the output row groups (WebDataset tar,
curated Parquet, gallery) that hold such a record are rewritten, each by one whole-file write,
so no byte of a removed image is left in the corpus's output and no reader ever sees a
half-written tar; the corpus manifest is updated. Each identifier is recorded in the corpus's
takedown list with the reason, the date and what it removed (run keys, keys, files rewritten);
the task logs that summary and returns it (XCom), and an asset event on the corpus (alias
`winnow_corpus`) carries the takedown and how many records it removed.

Idempotent and resumable: running the same list again removes nothing more, and a run killed
half-way finishes on its retry (or on a new run with the same list). Later `image_curation`
runs with this corpus drop a listed record before it is decoded, as outcome `takedown`
(counted `takedowns`), so a listed image never comes back, even one listed before any run.

## Params
| param | meaning |
|---|---|
| `corpus_uri` | the corpus (local path, `s3://`, `gs://`): the `corpus_uri` of the curation runs |
| `list_uri` | a text file (one identifier a line) or a Parquet file of identifiers; each a 32-hex `uid` (the image bytes' id), a record `key`, or a source `url` |
| `reason` | why (kept with every identifier in the takedown list); required |
| `storage_conn_id` | Airflow connection of type `aws` for `s3://` (as `image_curation`'s); empty: the `AWS_*` environment variables |

    airflow dags trigger image_takedown --conf '{"corpus_uri": "s3://bucket/corpus", "list_uri": "s3://bucket/takedowns/2025-03-14.txt", "reason": "opt-out request 1234"}'
"""

PARAMS = {
    "corpus_uri": Param(type="string", minLength=1, title="Corpus",
                        description="The corpus to remove records from (local path, s3://, gs://)."),
    "list_uri": Param(type="string", minLength=1, title="Takedown list",
                      description="Text file (one identifier a line) or Parquet file of identifiers: a 32-hex uid, "
                                  "a record key or a source url each."),
    "reason": Param(type="string", minLength=1, pattern=r"\S", title="Reason",
                    description="Why these records are taken down; recorded with every identifier."),
    "storage_conn_id": Param(None, type=["null", "string"], title="Storage connection",
                             description="Airflow connection of type aws for s3://; empty: the AWS_* environment "
                                         "variables."),
}

with DAG(
    dag_id=DAG_ID,
    description="Remove the records a list names (uid, key or url) from a winnow corpus, and keep them out.",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    params=PARAMS,
    default_args={"owner": "data-curation", "retries": 2, "retry_delay": timedelta(seconds=30)},
    doc_md=DOC_MD,
    tags=["winnow", "corpus"],
) as dag:
    TakedownOperator(task_id="takedown")
