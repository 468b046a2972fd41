-- Every catalog row whose product_id is on another row too, with the shard it falls in and up to 5 of the
-- other rows: scoring quarantines each of them as `duplicate_id` (the rule: pipeline/scoring/duplicate_ids.py). Ids
-- were normalised by pipeline.io.text.normalize_product_ids, the one normalisation of ingest, scoring and
-- publish; a null (missing) id is nobody's duplicate. A row's position in plan order is
-- $starts[file + 1] + row, and shards cut that order every $rows_per_shard rows (scoring.planner._piece_groups);
-- $shard_format is how scoring formats a shard index into its id. `row` is 0-based within its file.
-- params: $ids (Parquet: file, row, product_id, content_hash; pipeline/scoring/catalog_scan.py), per file in
--         plan order $uris, $names, $starts; $rows_per_shard, $shard_format
WITH duplicated AS (
    SELECT product_id, count(*) AS n
    FROM read_parquet($ids)
    GROUP BY product_id
    HAVING count(*) > 1
), rows_of AS (
    SELECT
        i.file,
        i.row,
        i.product_id,
        d.n,
        $names[i.file + 1] || ' row ' || i.row AS position,
        row_number() OVER (PARTITION BY i.product_id ORDER BY i.file, i.row) AS k
    FROM read_parquet($ids) AS i
    JOIN duplicated AS d USING (product_id)
), firsts AS (
    SELECT product_id, list(position ORDER BY k) AS positions
    FROM rows_of
    WHERE k <= 6
    GROUP BY product_id
)
SELECT
    format($shard_format, ($starts[r.file + 1] + r.row) // $rows_per_shard) AS shard,
    $uris[r.file + 1] AS file,
    r.row,
    r.product_id,
    format('{} catalog rows have this product_id (also {}{}); none is scored, so none shows another row''s prediction',
           r.n, array_to_string(list_filter(f.positions, lambda p: p <> r.position)[1:5], ', '),
           CASE WHEN r.n > 6 THEN ', ...' ELSE '' END) AS detail
FROM rows_of AS r
JOIN firsts AS f USING (product_id)
ORDER BY shard, r.file, r.row;
