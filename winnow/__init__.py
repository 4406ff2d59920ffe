"""winnow: image-dataset curation engine (index, embed, filter, dedup, write) over row groups.

The engine imports neither Airflow nor anything under ``operators/``.
"""

__version__ = "0.1.0"
