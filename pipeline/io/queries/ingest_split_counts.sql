-- Kept rows per split.
-- needs: temp table `kept` (ingest_kept.sql)
SELECT split, count(*) AS n
FROM kept
GROUP BY split
ORDER BY split;
