"""WebDataset shard index, ranged reads of image bytes, and the sample-data generator."""
