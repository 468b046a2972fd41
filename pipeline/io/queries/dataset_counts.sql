-- Rows per split as actually written, read back from storage to check the manifest's counts.
-- params: $files (list of Parquet URIs)
SELECT split, count(*) AS n
FROM read_parquet($files)
GROUP BY split
ORDER BY split;
