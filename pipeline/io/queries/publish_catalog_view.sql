-- The catalog joined with its latest predicted attributes. Prediction columns are prefixed `predicted_`
-- so they never collide with the catalog's own columns (which may hold human labels for the same tasks);
-- a catalog column that is itself named like one is renamed by publish (pipeline.scoring.publish._unique_columns).
-- Image bytes are left out. Products never scored (or quarantined) keep null predicted_ columns.
-- A catalog row is matched by its product_id normalised as scoring normalised the prediction's
-- (cmaclip_product_id: decoded, trimmed). A product_id on more than one row of this catalog gets null
-- predicted_ columns on every one of its rows, whatever any run predicted for it: no prediction is each
-- row's own, and scoring quarantines these rows as `duplicate_id` (pipeline/scoring/duplicate_ids.py).
-- params: $catalog (list of catalog Parquet files), $latest (list holding the latest-predictions file)
-- needs: function cmaclip_product_id (pipeline.scoring.duplicate_ids.register_key)
WITH catalog AS (
    SELECT COLUMNS(lambda c: c <> 'image'), cmaclip_product_id(product_id) AS "__cmaclip_key"
    FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false)
), keyed AS (
    SELECT *, count(*) OVER (PARTITION BY "__cmaclip_key") AS "__cmaclip_rows"
    FROM catalog
), latest AS (
    SELECT COLUMNS('^(.*)$') AS "predicted_\1"
    FROM read_parquet($latest, hive_partitioning = false)
)
SELECT keyed.* EXCLUDE ("__cmaclip_key", "__cmaclip_rows"), latest.* EXCLUDE (predicted_product_id)
FROM keyed
LEFT JOIN latest ON keyed."__cmaclip_key" = latest.predicted_product_id AND keyed."__cmaclip_rows" = 1
ORDER BY keyed.product_id;
