"""Test oracles: the exact in-process algorithms the distributed engine is checked against.

They live beside the benchmarks, which measure them too (benchmarks never import ``tests``);
the tests import them from here. The package (``winnow``) never imports these.
"""
