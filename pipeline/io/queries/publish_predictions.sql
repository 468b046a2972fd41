-- A run's predictions as publish reads them into the new state (pipeline.scoring.published_tables.latest sorts
-- them by product_id and keeps one row per product). The run's prediction files cover the whole current
-- catalog (rescored rows and rows carried over with their own lineage), so a product deleted from the catalog
-- is not in them and leaves the state; nothing older is read. Within a run a product_id has at most one
-- prediction (scoring quarantines every row of an id that is on several catalog rows:
-- pipeline/scoring/duplicate_ids.py); should two ever meet, the newest scored_at wins, ties broken by file and
-- row position, so the result is deterministic: the last four columns order them, oldest first (a null
-- scored_at first). A plain scan: DuckDB streams it, where a sort or a window would hold the run in memory.
-- params: $predictions (list of the run's prediction Parquet files, from its manifest)
SELECT * EXCLUDE (filename, file_row_number),
       scored_at IS NOT NULL AS "__cmaclip_scored",
       epoch_us(scored_at) AS "__cmaclip_scored_us",
       filename AS "__cmaclip_file",
       file_row_number AS "__cmaclip_row"
FROM read_parquet($predictions, union_by_name = true, hive_partitioning = false,
                  filename = true, file_row_number = true);
