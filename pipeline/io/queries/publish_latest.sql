-- The new published state: one row per product of one finalized run, ordered by product_id. The run's
-- prediction files cover the whole current catalog (rescored rows and rows carried over with their own
-- lineage), so a product deleted from the catalog is not in them and leaves the state; nothing older is read.
-- Within a run a product_id has at most one prediction (scoring quarantines every row of an id that is on
-- several catalog rows: pipeline/scoring/duplicate_ids.py); should two ever meet, the newest scored_at
-- wins, ties broken by file and row position, so the result is deterministic.
-- params: $predictions (list of the run's prediction Parquet files, from its manifest)
SELECT * EXCLUDE (filename, file_row_number)
FROM read_parquet($predictions, union_by_name = true, hive_partitioning = false,
                  filename = true, file_row_number = true)
QUALIFY row_number() OVER (
    PARTITION BY product_id
    ORDER BY scored_at DESC, filename DESC, file_row_number DESC
) = 1
ORDER BY product_id;
