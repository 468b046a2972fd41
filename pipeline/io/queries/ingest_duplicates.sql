-- Every staged row that lost its product_id to another row, with what differs from the kept one.
-- needs: temp table `ranked` (ingest_rank.sql)
CREATE OR REPLACE TEMP TABLE duplicates AS
SELECT
    d.seq,
    d.product_id,
    format('another row with this id was kept (content hash {}); this one differs in: {}',
           left(k.content_hash, 12),
           coalesce(nullif(concat_ws(', ',
               CASE WHEN d.image_sha <> k.image_sha THEN 'image' END,
               CASE WHEN d.title_sha IS DISTINCT FROM k.title_sha THEN 'title' END,
               CASE WHEN d.labels_key <> k.labels_key THEN 'labels' END), ''), 'nothing (exact copy)')) AS detail
FROM ranked AS d
JOIN ranked AS k ON k.product_id = d.product_id AND k.rank = 1
WHERE d.rank > 1;
