-- Retention deletes the items of old exported files; the file row stays, so the same content
-- dropped again is still recognised as a duplicate.
ALTER TABLE input_files ADD COLUMN purged_at TEXT;
