"""The stages' compute, one module per stage (each a plain class or function, no Airflow): decode
and embed, the score heads (aesthetic, nsfw, clip_score, ...), thresholds, the dedup steps, status,
write, and the helpers they share (models, devices, embeddings, kept records, thumbnails).

Each keeps the stage contract (:mod:`winnow.rowgroups.task`) and is named, with its config and
upstream stages, in the registry (:mod:`winnow.registry`); nothing below the stages imports them.
"""
