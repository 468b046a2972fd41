-- Label counts per task and split over the kept rows; null labels (missing) are not counted.
-- Task columns are every staging column except the fixed ones and the internal `__` ones.
-- needs: temp table `kept`; params: $staging
WITH labels AS (
    UNPIVOT (
        SELECT * EXCLUDE (product_id, title, image, "__content_hash", "__image_sha", "__labels_key")
        FROM read_parquet($staging)
    )
    ON COLUMNS(* EXCLUDE ("__seq"))
    INTO NAME task VALUE label
)
SELECT l.task, l.label, k.split, count(*) AS n
FROM labels AS l
JOIN kept AS k ON k.seq = l."__seq"
GROUP BY ALL
ORDER BY ALL;
