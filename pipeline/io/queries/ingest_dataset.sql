-- The dataset rows: kept rows only, grouped by split and in hash order within a split, so the
-- dataset's row groups are random samples even when the catalog is sorted (by date, by category).
-- needs: temp table `kept`; params: $staging
SELECT
    s.* EXCLUDE ("__seq", "__content_hash", "__image_sha", "__labels_key"),
    k.split
FROM read_parquet($staging) AS s
JOIN kept AS k ON k.seq = s."__seq"
ORDER BY
    CASE k.split WHEN 'train' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END,
    k.split_key,
    s.product_id;
