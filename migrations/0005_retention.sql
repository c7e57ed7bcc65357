-- Retention deletes the items of old exported files; the file row stays, so the same content
-- dropped again is still recognised as a duplicate.
ALTER TABLE input_files ADD COLUMN purged_at TEXT;

-- The files view gains `purged_at`, when retention deleted the file's items; the columns
-- before it are unchanged.
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
