-- Products per published value of each task: each class, and null (abstained: the top-1 was below the
-- task's threshold), in the new state and in the previous published one: what the population stability
-- index compares.
-- needs: views new_state and previous_state (pipeline.scoring.report)
SELECT 'new' AS state, task, label, count(*) AS products
FROM new_state GROUP BY task, label
UNION ALL
SELECT 'previous' AS state, task, label, count(*) AS products
FROM previous_state GROUP BY task, label
ORDER BY state, task, label;
