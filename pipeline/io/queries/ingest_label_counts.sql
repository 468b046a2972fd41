-- Label counts per task and split over the kept rows; null labels (missing) are not counted.
-- needs: temp table `kept` (ingest_kept.sql); params: $staged (the groups' rows.parquet), $tasks
WITH labels AS (
    UNPIVOT (
        SELECT "__group" AS "__grp", file_row_number AS "__row", COLUMNS(lambda c: list_contains($tasks, c))
        FROM read_parquet($staged, file_row_number = true)
    )
    ON COLUMNS(lambda c: list_contains($tasks, c))
    INTO NAME task VALUE label
)
SELECT l.task, l.label, k.split, count(*) AS n
FROM labels AS l
JOIN kept AS k ON k.grp = l."__grp" AND k.row = l."__row"
GROUP BY ALL
ORDER BY ALL;
