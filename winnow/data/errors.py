"""Errors of the data layer: a bad input URI or a shard that cannot be read.

Each names the thing at fault (the URI, the shard, the key) and what to do about it.
"""

from __future__ import annotations

from winnow.rowgroups.errors import WinnowError


class InputError(WinnowError):
    """The input URI is missing or holds no WebDataset shards."""

    def __init__(self, input_uri: str, message: str) -> None:
        self.input_uri = input_uri
        super().__init__(message)


class ShardError(WinnowError):
    """A shard is unreadable, truncated or has a broken tar header."""

    def __init__(self, shard: str, message: str) -> None:
        self.shard = shard
        super().__init__(message)
