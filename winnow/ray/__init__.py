"""Runs a stage over the row groups of one partition with Ray Data; cluster connect."""
