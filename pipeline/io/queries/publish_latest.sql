-- The latest prediction per product across every finalized scoring run (one row per product_id).
-- Newest scored_at wins. Within a run a product_id has at most one prediction (scoring quarantines every
-- row of a product_id that is on several catalog rows: pipeline/scoring/duplicate_ids.py), so a tie is two runs
-- scored at the same instant; it breaks on run, file and row position, so the result is deterministic.
-- params: $predictions (list of prediction Parquet files, from the run manifests)
SELECT * EXCLUDE (filename, file_row_number)
FROM read_parquet($predictions, union_by_name = true, hive_partitioning = false,
                  filename = true, file_row_number = true)
QUALIFY row_number() OVER (
    PARTITION BY product_id
    ORDER BY scored_at DESC, run_id DESC, filename DESC, file_row_number DESC
) = 1
ORDER BY product_id;
