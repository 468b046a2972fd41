-- The kept rows and their place in the dataset: `pos`, the row's position within its split, in split-key
-- order (then product_id, then seq), so every row group of the dataset is a random sample of its split even
-- when the catalog is sorted (by date, by category). The split key is md5(product_id)'s first 48 bits
-- (pipeline.ingest.plan.split_key), and the split a range of it, set when the row was staged.
-- needs: temp table `ranked` (ingest_rank.sql)
CREATE OR REPLACE TEMP TABLE kept AS
SELECT
    grp,
    row,
    split,
    row_number() OVER (PARTITION BY split ORDER BY split_key, product_id, seq) - 1 AS pos
FROM ranked
WHERE rank = 1;
