"""Sharded batch scoring in img2dataset's manner: `planner` cuts the catalog into shards; `runner` scores one
shard (`reader` prepares its batches, the `predictor` runs them, `writer` commits the files, the done marker
comes last); `finalize` checks a run and writes its manifest; `report` says what the run changes for catalog
teams, `gate` decides whether it may be published, `publish` makes it a new version of the published state
(`versions`: the current one, rollback; `retention`: what is kept). The
`distributor` runs every shard in this process (`cmaclip score`); the Airflow DAG maps them over workers.

A shard's output path is a function of (input snapshot, shard id, model version) (`layout`); outputs are
committed by rename (or a single object put) and the done marker with the row counts is written last, so a
rerun skips committed shards and redoes the rest, in any order, on any worker."""
