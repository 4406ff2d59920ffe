"""WebDataset shard index, ranged reads of image bytes, and the sample-data generator."""

from winnow.data.index import IndexConfig, IndexResult, build_index, load_index
from winnow.data.reader import read_members
from winnow.data.shards import list_shards
from winnow.data.tarscan import ShardScan, scan_shard, split_key

__all__ = [
    "IndexConfig",
    "IndexResult",
    "ShardScan",
    "build_index",
    "list_shards",
    "load_index",
    "read_members",
    "scan_shard",
    "split_key",
]
