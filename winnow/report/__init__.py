"""The read side of a run for people: row-group map, gallery sample, score histograms.

Everything here reads committed files only (storage is the source of truth) and never decodes
a full image: what the Airflow plugin's views show, usable without Airflow.
"""
