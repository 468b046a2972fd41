-- Rank the rows that passed validation within each product_id. Rank 1 is kept: the row with the
-- smallest content hash (sha256 of image, title and labels), the first one seen on a tie. The hash
-- does not depend on input order, so a reshuffled catalog keeps the same rows.
-- params: $staging (Parquet written by ingest's first pass)
CREATE OR REPLACE TEMP TABLE ranked AS
SELECT
    "__seq"          AS seq,
    product_id,
    title,
    "__content_hash" AS content_hash,
    "__image_sha"    AS image_sha,
    "__labels_key"   AS labels_key,
    row_number() OVER (PARTITION BY product_id ORDER BY "__content_hash", "__seq") AS rank
FROM read_parquet($staging);
