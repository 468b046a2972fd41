-- Disagreements: the products whose catalog value differs from a label above the threshold (likely
-- catalog errors, or model errors), both values and the confidence; for review, most confident first.
-- Values compare after cleaning (pipeline.io.text.normalize_label), case-sensitively, as ingest reads labels.
-- Columns: pipeline.contracts.DISAGREEMENTS.
-- needs: views new_state and catalog_values (pipeline.scoring.report: product_id, task, value)
WITH catalog AS (
    SELECT product_id, task, value
    FROM catalog_values
    WHERE product_id IS NOT NULL
    QUALIFY count(*) OVER (PARTITION BY product_id, task) = 1
)
SELECT n.product_id, n.task, c.value AS catalog_value, n.label AS predicted, n.confidence
FROM new_state AS n
JOIN catalog AS c ON n.product_id = c.product_id AND n.task = c.task
WHERE n.label IS NOT NULL AND c.value IS NOT NULL AND c.value <> n.label
ORDER BY n.confidence DESC, n.task, n.product_id;
