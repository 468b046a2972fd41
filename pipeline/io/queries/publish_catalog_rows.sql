-- The catalog's rows as publish reads them into the catalog view (pipeline.scoring.published_tables.catalog_view
-- joins them with the new state and orders them by product_id). Image bytes are left out. Each row is keyed
-- by its product_id normalised as scoring normalised the prediction's (cmaclip_product_id: decoded, trimmed);
-- a row without one (null or blank) gets '', no product's id, so it matches no prediction. A plain scan:
-- DuckDB streams it, where a sort, a window or a join would hold the catalog in memory.
-- params: $catalog (list of catalog Parquet files)
-- needs: function cmaclip_product_id (pipeline.scoring.duplicate_ids.register_key)
SELECT COLUMNS(lambda c: c <> 'image'),
       coalesce(cmaclip_product_id(product_id), '') AS "__cmaclip_key",
       product_id IS NULL AS "__cmaclip_no_id"
FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false);
