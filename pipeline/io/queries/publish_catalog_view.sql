-- The catalog joined with its latest predicted attributes. Prediction columns are prefixed `predicted_`
-- so they never collide with the catalog's own columns (which may hold human labels for the same tasks);
-- a catalog column that is itself named like one is renamed by publish (pipeline.scoring.publish._unique_columns).
-- Image bytes are left out. Products never scored (or quarantined) keep null predicted_ columns.
-- A catalog row is matched by its product_id normalised as scoring normalised the prediction's
-- (cmaclip_product_id: decoded, trimmed). A product_id on more than one row of this catalog gets null
-- predicted_ columns on every one of its rows, whatever any run predicted for it: no prediction is each
-- row's own, and scoring quarantines these rows as `duplicate_id` (pipeline/scoring/duplicate_ids.py).
-- Those ids are found over the key column alone: a window over the whole catalog's rows is what DuckDB
-- cannot spill within its memory limit.
-- params: $catalog (list of catalog Parquet files), $latest (list holding the latest-predictions file)
-- needs: function cmaclip_product_id (pipeline.scoring.duplicate_ids.register_key)
WITH catalog AS (
    SELECT COLUMNS(lambda c: c <> 'image'), cmaclip_product_id(product_id) AS "__cmaclip_key"
    FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false)
), duplicated AS (
    SELECT cmaclip_product_id(product_id) AS "__cmaclip_key"
    FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false)
    GROUP BY ALL
    HAVING count(*) > 1
), latest AS (
    SELECT COLUMNS('^(.*)$') AS "predicted_\1"
    FROM read_parquet($latest, hive_partitioning = false)
), unique_latest AS (
    SELECT latest.*
    FROM latest
    ANTI JOIN duplicated ON duplicated."__cmaclip_key" = latest.predicted_product_id
)
SELECT catalog.* EXCLUDE ("__cmaclip_key"), unique_latest.* EXCLUDE (predicted_product_id)
FROM catalog
LEFT JOIN unique_latest ON catalog."__cmaclip_key" = unique_latest.predicted_product_id
ORDER BY catalog.product_id;
