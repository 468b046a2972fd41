-- The catalog rows whose prediction is carried over from the published state instead of being scored (the
-- rule: pipeline/scoring/carry_over.py): the state has a prediction of the row's product_id by this run's model,
-- with every column the run writes ($columns; $required not null), from the same content hash; a product_id on
-- several catalog rows is never carried (it is quarantined). $at_read: the plan could not hash the rows
-- (image_uri), so every row that passes the rest is a candidate, and the shard compares the hashes once it has
-- fetched the image. A row's shard as in score_duplicates.sql. Each row: shard, file, row, the state's columns.
-- params: $ids (Parquet: file, row, product_id, content_hash; pipeline/scoring/catalog_scan.py), $state (the
--         published state, Parquet), $model_name, $model_version, $columns, $required, $at_read, per file in
--         plan order $uris, $starts; $rows_per_shard, $shard_format
WITH state AS (
    SELECT COLUMNS(lambda c: list_contains($columns, c))
    FROM read_parquet($state)
    WHERE model_name = $model_name
      AND model_version = $model_version
      AND COLUMNS(lambda c: list_contains($required, c)) IS NOT NULL
), duplicated AS (
    SELECT product_id
    FROM read_parquet($ids)
    GROUP BY product_id
    HAVING count(*) > 1
)
SELECT
    format($shard_format, ($starts[r.file + 1] + r.row) // $rows_per_shard) AS shard,
    $uris[r.file + 1] AS file,
    r.row,
    s.*
FROM read_parquet($ids) AS r
JOIN state AS s ON s.product_id = r.product_id AND ($at_read OR s.content_hash = r.content_hash)
ANTI JOIN duplicated AS d ON d.product_id = r.product_id
ORDER BY shard, r.file, r.row;
