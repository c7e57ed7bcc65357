-- Indexes that let the real-time path find its few items without scanning a large queue of
-- batch items: queued items by endpoint and urgency in id order, and items with a deadline.
CREATE INDEX work_items_queue ON work_items (state, endpoint, urgent, id);
CREATE INDEX work_items_deadlines ON work_items (state, endpoint, deadline)
    WHERE deadline IS NOT NULL;
