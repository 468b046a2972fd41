-- Where each part of the dataset takes its rows from: per split (in $splits order) and part (every
-- $part_rows positions), the group and the row in that group's rows.parquet of each of its rows, in dataset
-- order. A group's rows are staged in the same order, so a part reads one contiguous range of each group.
-- needs: temp table `kept` (ingest_kept.sql); params: $splits, $part_rows
SELECT split, pos // $part_rows AS part, grp, row
FROM kept
ORDER BY list_position($splits, split), pos;
