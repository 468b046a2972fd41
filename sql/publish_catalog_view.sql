-- The catalog joined with its latest predicted attributes. Prediction columns are prefixed `predicted_`
-- so they never collide with the catalog's own columns (which may hold human labels for the same tasks);
-- image bytes are left out. Products never scored (or quarantined) keep null predicted_ columns.
-- params: $catalog (list of catalog Parquet files), $latest (list holding the latest-predictions file)
WITH catalog AS (
    SELECT COLUMNS(lambda c: c <> 'image')
    FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false)
), latest AS (
    SELECT COLUMNS('^(.*)$') AS "predicted_\1"
    FROM read_parquet($latest, hive_partitioning = false)
)
SELECT catalog.*, latest.* EXCLUDE (predicted_product_id)
FROM catalog
LEFT JOIN latest ON catalog.product_id = latest.predicted_product_id
ORDER BY catalog.product_id;
