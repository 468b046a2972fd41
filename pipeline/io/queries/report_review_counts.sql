-- Rows per task of a fill or disagreements file.
-- params: $review (list holding the file)
SELECT task, count(*) AS products
FROM read_parquet($review, hive_partitioning = false)
GROUP BY task;
