-- Whether a rollback of the batch was ever refused. Such a batch reads failed from then on,
-- while the rollback is asked for again too: it will not be activated.
ALTER TABLE batches ADD COLUMN rollback_refused INTEGER NOT NULL DEFAULT 0;
UPDATE batches SET rollback_refused = 1 WHERE EXISTS (
    SELECT 1 FROM events
    WHERE stream_id = 'batch-' || batches.batch_id AND event_type = 'BatchRollbackFailed'
);
