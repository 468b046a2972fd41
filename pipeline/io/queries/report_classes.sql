-- Products per predicted class (labels above the threshold; abstentions are counted apart) of each task,
-- in the new state and in the previous published one: what the population stability index compares.
-- needs: views new_state and previous_state (pipeline.scoring.report)
SELECT 'new' AS state, task, label, count(*) AS products
FROM new_state WHERE label IS NOT NULL GROUP BY task, label
UNION ALL
SELECT 'previous' AS state, task, label, count(*) AS products
FROM previous_state WHERE label IS NOT NULL GROUP BY task, label
ORDER BY state, task, label;
