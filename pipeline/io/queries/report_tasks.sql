-- Per task of the new state: products, abstentions (null label), mean λ, and against the previous
-- published state, among the products this run rescored: how many the previous state has and how many
-- of those changed label (null against a label, either way, is a change).
-- needs: views new_state and previous_state (pipeline.scoring.report: product_id, task, label,
-- confidence, image_weight, rescored), one row per (product, task)
SELECT n.task,
       count(*) AS products,
       count(*) FILTER (WHERE n.label IS NULL) AS abstained,
       avg(n.image_weight) AS mean_image_weight,
       count(*) FILTER (WHERE n.rescored) AS rescored,
       count(p.product_id) FILTER (WHERE n.rescored) AS compared,
       count(*) FILTER (WHERE n.rescored AND p.product_id IS NOT NULL AND n.label IS DISTINCT FROM p.label)
           AS changed
FROM new_state AS n
LEFT JOIN previous_state AS p ON n.product_id = p.product_id AND n.task = p.task
GROUP BY n.task
ORDER BY n.task;
