"""The runner: a stage over a partition's row groups with Ray Data (``runner``), other units
(buckets, shard groups) as Ray tasks (``units``), both on one chassis (``chassis``: where they run,
a worker's setup, the driver's progress); Ray connect and the shared local head (``cluster``);
request sizes from the alive nodes (``resources``). Below the stages: it runs any
:class:`~winnow.rowgroups.task.Stage` it is given and imports none.
"""
