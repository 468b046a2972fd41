-- Assign each kept row to a split by a stable hash of its product_id: u = first 48 bits of
-- md5(product_id) / 2^48, uniform in [0, 1). train if u < $train, validation if u < $train +
-- $validation, else test. A product keeps its split across re-ingests, catalog growth and engines
-- (pipeline.ingest.dataset.split_of computes the same value in Python). `split_key` orders rows within a
-- split, so every row group of the dataset is a random sample of it.
-- needs: temp table `ranked`; params: $train, $validation
CREATE OR REPLACE TEMP TABLE kept AS
WITH hashed AS (
    SELECT
        seq,
        product_id,
        ('0x' || substr(md5(product_id), 1, 12))::UBIGINT / 281474976710656.0 AS split_key
    FROM ranked
    WHERE rank = 1
)
SELECT
    seq,
    product_id,
    split_key,
    CASE
        WHEN split_key < $train THEN 'train'
        WHEN split_key < $train + $validation THEN 'validation'
        ELSE 'test'
    END AS split
FROM hashed;
