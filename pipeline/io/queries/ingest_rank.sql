-- Rank the staged rows (every row that passed validation, in every group) within each product_id. Rank 1 is
-- kept: the row with the smallest content hash (sha256 of image, title and labels), the first one seen on a
-- tie. The hash does not depend on input order, so a reshuffled catalog keeps the same rows. Only the small
-- per-row metadata is read, never the image bytes. `grp` and `row` place a row in its group's rows.parquet.
-- params: $staged (the groups' rows.parquet, pipeline/ingest/staging.py)
CREATE OR REPLACE TEMP TABLE ranked AS
SELECT
    "__group"        AS grp,
    file_row_number  AS row,
    "__seq"          AS seq,
    product_id,
    "__key"          AS split_key,
    split,
    "__content_hash" AS content_hash,
    "__image_sha"    AS image_sha,
    "__title_sha"    AS title_sha,
    "__labels_key"   AS labels_key,
    row_number() OVER (PARTITION BY product_id ORDER BY "__content_hash", "__seq") AS rank
FROM read_parquet($staged, file_row_number = true);
