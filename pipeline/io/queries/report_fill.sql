-- Fill: per task, the products whose catalog value is missing (no such column, null, or blank once
-- cleaned) and that the new state gives a label above the threshold. By task, most confident first.
-- An id on several catalog rows is left out, as the published catalog leaves it (duplicate_ids.py).
-- Columns: pipeline.contracts.FILL.
-- needs: views new_state and catalog_values (pipeline.scoring.report: product_id, task, value)
WITH catalog AS (
    SELECT product_id, task, value
    FROM catalog_values
    WHERE product_id IS NOT NULL
    QUALIFY count(*) OVER (PARTITION BY product_id, task) = 1
)
SELECT n.product_id, n.task, n.label AS predicted, n.confidence
FROM new_state AS n
JOIN catalog AS c ON n.product_id = c.product_id AND n.task = c.task
WHERE n.label IS NOT NULL AND c.value IS NULL
ORDER BY n.task, n.confidence DESC, n.product_id;
