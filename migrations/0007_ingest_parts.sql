-- A large input file is stored in parts, each in a transaction of its own, so that a million
-- lines neither hold the write lock for the whole file nor grow the WAL to the size of the
-- file. While a file is being stored, this is the number of its last line in the committed
-- parts, and `report` covers the lines up to it; a restart reads on from the next line.
-- It is NULL once the whole file is stored, and for files stored in one transaction.
ALTER TABLE input_files ADD COLUMN resume_line INTEGER;
