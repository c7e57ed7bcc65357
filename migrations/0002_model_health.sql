-- The model that produced each answer: the requested one, or its fallback after overloads.
ALTER TABLE work_items ADD COLUMN model_used TEXT;

-- Models whose batch jobs failed for capacity: no job for them is created before
-- `paused_until`, and while `recovering` each create pushes `paused_until` one cooldown ahead.
CREATE TABLE model_pauses (
    model         TEXT PRIMARY KEY,
    paused_until  TEXT    NOT NULL,
    reason        TEXT    NOT NULL
);

DROP VIEW results;
CREATE VIEW results AS
SELECT f.name            AS input_file,
       w.line_no         AS line_no,
       w.custom_id       AS custom_id,
       w.endpoint        AS endpoint,
       w.model           AS model,
       w.state           AS state,
       w.status_code     AS status_code,
       w.response        AS response,
       w.error           AS error,
       w.attempts        AS attempts,
       w.prompt_tokens   AS prompt_tokens,
       w.completion_tokens AS completion_tokens,
       w.total_tokens    AS total_tokens,
       CASE WHEN w.batch_id IS NOT NULL THEN 'batch'
            WHEN w.attempts > 0 OR w.state = 'in_flight' THEN 'realtime'
            ELSE 'none' END AS path,
       w.finished_at     AS finished_at,
       COALESCE(w.model_used, CASE WHEN w.state = 'succeeded' THEN w.model END) AS model_used
FROM work_items w
JOIN input_files f ON f.id = w.file_id;
