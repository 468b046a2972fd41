-- The catalog's columns as its files meet in publish_catalog_rows.sql (by name), with DuckDB's types
-- (VARCHAR and BLOB files give BLOB). Binds only: no row is read.
-- params: $catalog (list of catalog Parquet files)
SELECT *
FROM read_parquet($catalog, union_by_name = true, hive_partitioning = false)
LIMIT 0;
