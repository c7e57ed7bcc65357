-- A custom_id is unique within its input file. Ingest relies on this index to find a repeated
-- id without holding every id of the file in memory, and exports use it to look items up.
CREATE UNIQUE INDEX work_items_by_custom_id ON work_items (file_id, custom_id);
