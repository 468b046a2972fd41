-- Every row that lost its product_id to another row, with what differs from the kept one.
-- needs: temp table `ranked` (ingest_rank.sql)
SELECT
    d.seq,
    d.product_id,
    k.content_hash AS kept_content_hash,
    concat_ws(', ',
        CASE WHEN d.image_sha <> k.image_sha THEN 'image' END,
        CASE WHEN d.title IS DISTINCT FROM k.title THEN 'title' END,
        CASE WHEN d.labels_key <> k.labels_key THEN 'labels' END
    ) AS differs
FROM ranked AS d
JOIN ranked AS k ON k.product_id = d.product_id AND k.rank = 1
WHERE d.rank > 1
ORDER BY d.seq;
