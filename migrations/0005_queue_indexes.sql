-- Indexes over the queue. Each is partial: a row has an entry only while it matches, so the
-- indexes stay the size of the queue rather than of the table, and ingest, which inserts
-- queued rows with no batch, lease or deadline, writes to as few of them as possible.
DROP INDEX work_items_by_state;
DROP INDEX work_items_by_batch;
CREATE INDEX work_items_by_batch ON work_items (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX work_items_in_flight ON work_items (lease_expires_at) WHERE state = 'in_flight';

-- The real-time path reads urgent items, and the items of endpoints that cannot be batched,
-- in id order without scanning a large queue of batch items.
CREATE INDEX work_items_queue ON work_items (endpoint, urgent, id) WHERE state = 'queued';
CREATE INDEX work_items_deadlines ON work_items (endpoint, deadline)
    WHERE state = 'queued' AND deadline IS NOT NULL;

-- The packer finds each endpoint and model with queued batch items, and the oldest of them,
-- by seeking this index rather than counting the queue.
CREATE INDEX work_items_pack ON work_items (endpoint, model, id)
    WHERE state = 'queued' AND urgent = 0;
