-- Input files: one row per distinct file content dropped into the inbox.
CREATE TABLE input_files (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,                 -- file name as dropped, e.g. "evals.jsonl"
    sha256        TEXT    NOT NULL UNIQUE,          -- content hash: the same content is ingested once
    urgent        INTEGER NOT NULL CHECK (urgent IN (0, 1)),
    lines_total   INTEGER NOT NULL,                 -- non-blank lines read
    items_total   INTEGER NOT NULL,                 -- lines that became work items
    errors_total  INTEGER NOT NULL,                 -- lines rejected with a reason
    report        TEXT    NOT NULL,                 -- the report JSON written beside the file
    disposition   TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (disposition IN ('pending', 'processed', 'rejected')),
    moved_to      TEXT,                             -- final path once the file left the inbox
    ingested_at   TEXT    NOT NULL
);

-- Provider batch jobs. The state column records each remote call's intent before it is made
-- and its outcome after, so a restart knows what may already exist at the provider.
CREATE TABLE batches (
    id                 INTEGER PRIMARY KEY,
    endpoint           TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    state              TEXT    NOT NULL
                       CHECK (state IN ('packed', 'uploading', 'uploaded', 'creating',
                                        'submitted', 'harvested')),
    item_count         INTEGER NOT NULL,
    bytes              INTEGER NOT NULL,
    upload_name        TEXT    NOT NULL UNIQUE,      -- file name given to the provider
    input_file_id      TEXT,
    provider_batch_id  TEXT    UNIQUE,
    provider_status    TEXT,
    progress           REAL,
    output_file_id     TEXT,
    error_file_id      TEXT,
    error              TEXT,
    created_at         TEXT    NOT NULL,
    submitted_at       TEXT,
    finished_at        TEXT,
    next_poll_at       TEXT
);
CREATE INDEX batches_by_state ON batches (state);

-- Work items: one row per accepted input line.
CREATE TABLE work_items (
    id                 INTEGER PRIMARY KEY,
    file_id            INTEGER NOT NULL REFERENCES input_files (id),
    line_no            INTEGER NOT NULL,
    custom_id          TEXT    NOT NULL,             -- the user's id; the provider sees "bd-<id>"
    endpoint           TEXT    NOT NULL,
    model              TEXT    NOT NULL,
    body               TEXT    NOT NULL,             -- request body sent to the provider
    urgent             INTEGER NOT NULL CHECK (urgent IN (0, 1)),
    deadline           TEXT,
    state              TEXT    NOT NULL DEFAULT 'queued'
                       CHECK (state IN ('queued', 'packed', 'submitted', 'in_flight',
                                        'succeeded', 'failed')),
    batch_id           INTEGER REFERENCES batches (id),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    TEXT    NOT NULL,
    lease_expires_at   TEXT,                         -- set while a real-time call is under way
    status_code        INTEGER,
    response           TEXT,
    error              TEXT,                         -- final error of a failed item
    last_error         TEXT,                         -- most recent retryable error
    prompt_tokens      INTEGER,
    completion_tokens  INTEGER,
    total_tokens       INTEGER,
    created_at         TEXT    NOT NULL,
    updated_at         TEXT    NOT NULL,
    finished_at        TEXT,
    UNIQUE (file_id, line_no)
);
CREATE INDEX work_items_by_state ON work_items (state, next_attempt_at);
CREATE INDEX work_items_by_batch ON work_items (batch_id);

-- The query surface for users: one row per work item with its outcome.
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
       CASE WHEN w.batch_id IS NULL THEN 'realtime' ELSE 'batch' END AS path,
       w.finished_at     AS finished_at
FROM work_items w
JOIN input_files f ON f.id = w.file_id;
