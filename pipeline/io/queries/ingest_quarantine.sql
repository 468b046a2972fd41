-- The ingest's quarantine file: the rows each group refused, and the rows that lost their product_id to
-- another (reason $duplicate), in catalog row order.
-- needs: temp table `duplicates` (ingest_duplicates.sql); params: $quarantined (the groups' quarantine.parquet),
--        $duplicate
SELECT product_id, 'ingest' AS stage, reason, detail
FROM (
    SELECT "__seq" AS seq, product_id, reason, detail FROM read_parquet($quarantined)
    UNION ALL
    SELECT seq, product_id, $duplicate AS reason, detail FROM duplicates
)
ORDER BY seq;
