-- Result exports: `export_path` is chosen and committed before the file is written, so a
-- restart rewrites the same path; `exported_at` is set once the file was renamed into place.
-- `batchd retry` clears `exported_at` so that the file is exported again with the new results.
ALTER TABLE input_files ADD COLUMN exported_at TEXT;
ALTER TABLE input_files ADD COLUMN export_path TEXT;
-- Retention deletes the items of old exported files and sets `purged_at`; the file row stays,
-- so the same content dropped again is still recognised as a duplicate.
ALTER TABLE input_files ADD COLUMN purged_at TEXT;
-- Two input files never share an export file.
CREATE UNIQUE INDEX input_files_by_export_path ON input_files (export_path);

-- A counter that `batchd retry` and `batchd cancel` raise with each change, so that a running
-- daemon, which polls it, notices their changes at once instead of at its next idle pass.
CREATE TABLE operator_changes (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL
);
INSERT INTO operator_changes (id, generation) VALUES (1, 0);

-- Recent finishes, for the rates and time estimates of `batchd status`. Unfinished items have no
-- entry, so ingest does not write to this index.
CREATE INDEX work_items_by_finished_at ON work_items (finished_at) WHERE finished_at IS NOT NULL;

-- The views below are the stable query surface: columns may be added, but none is renamed or
-- removed. `path` is `batch`, `realtime`, or `none` for an item never sent.

-- One row per work item.
CREATE VIEW items AS
SELECT w.id                AS item_id,
       f.name              AS input_file,
       w.file_id           AS file_id,
       w.line_no           AS line_no,
       w.custom_id         AS custom_id,
       w.endpoint          AS endpoint,
       w.model             AS model,
       w.state             AS state,
       w.status_code       AS status_code,
       w.response          AS response,
       w.error             AS error,
       w.last_error        AS last_error,
       w.attempts          AS attempts,
       w.prompt_tokens     AS prompt_tokens,
       w.completion_tokens AS completion_tokens,
       w.total_tokens      AS total_tokens,
       CASE WHEN w.batch_id IS NOT NULL THEN 'batch'
            WHEN w.attempts > 0 OR w.state = 'in_flight' THEN 'realtime'
            ELSE 'none' END AS path,
       b.provider_batch_id AS provider_batch_id,
       COALESCE(w.model_used, CASE WHEN w.state = 'succeeded' THEN w.model END) AS model_used,
       w.urgent            AS urgent,
       w.deadline          AS deadline,
       w.created_at        AS created_at,
       w.updated_at        AS updated_at,
       w.finished_at       AS finished_at
FROM work_items w
JOIN input_files f ON f.id = w.file_id
LEFT JOIN batches b ON b.id = w.batch_id;

-- One row per input file, with its items counted by state. `progress` is the share of items
-- that are succeeded or failed, from 0 to 1 (1 for a file without items).
CREATE VIEW files AS
SELECT f.id                AS file_id,
       f.name              AS input_file,
       f.moved_to          AS moved_to,
       f.disposition       AS disposition,
       f.urgent            AS urgent,
       f.lines_total       AS lines,
       f.items_total       AS items,
       f.errors_total      AS errors,
       COALESCE(SUM(w.state = 'queued'), 0)    AS queued,
       COALESCE(SUM(w.state = 'packed'), 0)    AS packed,
       COALESCE(SUM(w.state = 'submitted'), 0) AS submitted,
       COALESCE(SUM(w.state = 'in_flight'), 0) AS in_flight,
       COALESCE(SUM(w.state = 'succeeded'), 0) AS succeeded,
       COALESCE(SUM(w.state = 'failed'), 0)    AS failed,
       CASE WHEN COUNT(w.id) = 0 THEN 1.0
            ELSE CAST(COALESCE(SUM(w.state IN ('succeeded', 'failed')), 0) AS REAL) / COUNT(w.id)
       END                 AS progress,
       f.ingested_at       AS ingested_at,
       f.exported_at       AS exported_at,
       f.export_path       AS export_path,
       f.purged_at         AS purged_at
FROM input_files f
LEFT JOIN work_items w ON w.file_id = f.id
GROUP BY f.id;

-- One row per provider batch job, including jobs not yet created at the provider
-- (`provider_batch_id` is NULL until then). `status` is the provider's status once the job was
-- created, and batchd's own state before.
CREATE VIEW jobs AS
SELECT b.id                AS batch_id,
       b.provider_batch_id AS provider_batch_id,
       CASE WHEN b.state IN ('submitted', 'harvested') THEN COALESCE(b.provider_status, b.state)
            ELSE b.state END AS status,
       b.state             AS local_state,
       b.endpoint          AS endpoint,
       b.model             AS model,
       b.item_count        AS item_count,
       b.progress          AS progress,
       b.error             AS error,
       b.created_at        AS created_at,
       b.submitted_at      AS submitted_at,
       b.finished_at       AS finished_at
FROM batches b;
