-- Items counted per input file and state, so that `batchd status`, `batchd files`, the
-- daemon's STATUS= line and its metrics read a few rows instead of counting every work item.
-- State changes and deletions of work items keep the counts exact through the triggers below.
-- Inserts do not fire a trigger: ingest adds the counts of the rows each multi-row insert
-- stored, in the same transaction, because a trigger per inserted row slows ingest down.
-- NOTE: rows inserted into `work_items` by other means than batchd's ingest are not counted.
CREATE TABLE item_counts (
    file_id  INTEGER NOT NULL,
    state    TEXT    NOT NULL,
    n        INTEGER NOT NULL,
    PRIMARY KEY (file_id, state)
) WITHOUT ROWID;

-- Counts of the items stored before this migration.
INSERT INTO item_counts (file_id, state, n)
SELECT file_id, state, COUNT(*) FROM work_items GROUP BY file_id, state;

-- A state change moves one item from the old state's count to the new one. `file_id` is
-- listed too, although batchd never changes it, so that no update can leave a count wrong.
CREATE TRIGGER work_items_count_update
AFTER UPDATE OF state, file_id ON work_items
WHEN OLD.state IS NOT NEW.state OR OLD.file_id IS NOT NEW.file_id
BEGIN
    UPDATE item_counts SET n = n - 1 WHERE file_id = OLD.file_id AND state = OLD.state;
    INSERT INTO item_counts (file_id, state, n) VALUES (NEW.file_id, NEW.state, 1)
        ON CONFLICT (file_id, state) DO UPDATE SET n = n + 1;
END;

-- Retention deletes the items of old files. Their counts drop to zero, and the rows stay.
CREATE TRIGGER work_items_count_delete
AFTER DELETE ON work_items
BEGIN
    UPDATE item_counts SET n = n - 1 WHERE file_id = OLD.file_id AND state = OLD.state;
END;

-- The `files` view counted its items by joining every work item. It now reads the counts,
-- with the same columns and values.
DROP VIEW files;
CREATE VIEW files AS
SELECT f.id                AS file_id,
       f.name              AS input_file,
       f.moved_to          AS moved_to,
       f.disposition       AS disposition,
       f.urgent            AS urgent,
       f.lines_total       AS lines,
       f.items_total       AS items,
       f.errors_total      AS errors,
       COALESCE(SUM(CASE WHEN c.state = 'queued' THEN c.n END), 0)    AS queued,
       COALESCE(SUM(CASE WHEN c.state = 'packed' THEN c.n END), 0)    AS packed,
       COALESCE(SUM(CASE WHEN c.state = 'submitted' THEN c.n END), 0) AS submitted,
       COALESCE(SUM(CASE WHEN c.state = 'in_flight' THEN c.n END), 0) AS in_flight,
       COALESCE(SUM(CASE WHEN c.state = 'succeeded' THEN c.n END), 0) AS succeeded,
       COALESCE(SUM(CASE WHEN c.state = 'failed' THEN c.n END), 0)    AS failed,
       CASE WHEN COALESCE(SUM(c.n), 0) = 0 THEN 1.0
            ELSE CAST(COALESCE(SUM(CASE WHEN c.state IN ('succeeded', 'failed') THEN c.n END), 0)
                      AS REAL) / SUM(c.n)
       END                 AS progress,
       f.ingested_at       AS ingested_at,
       f.exported_at       AS exported_at,
       f.export_path       AS export_path,
       f.purged_at         AS purged_at
FROM input_files f
LEFT JOIN item_counts c ON c.file_id = f.id
GROUP BY f.id;
