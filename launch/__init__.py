"""Launching the one medtwin graph on an engine: Dataflow, Flink, or a scheduled batch backfill.

`pipelines.graph.build_pipeline` is the only graph; these modules only choose
the runner, its options, and (for backfills) which days to read.
"""
