-- Whether a rollback of the batch was ever refused. Such a batch reads failed from then on,
-- while the rollback is asked for again too: it will not be activated.
ALTER TABLE batches ADD COLUMN rollback_refused INTEGER NOT NULL DEFAULT 0;
UPDATE batches SET rollback_refused = 1 WHERE EXISTS (
    SELECT 1 FROM events
    WHERE stream_id = 'batch-' || batches.batch_id AND event_type = 'BatchRollbackFailed'
);
-- The status and finished_at that rule gives. Up to the first refusal both rules agree, and
-- from it on such a batch (not activated) reads failed. The old rule could leave finished
-- only for a batch whose rows were all created and none failed, with no failed activation:
-- one that was still processing until that first refusal finished it.
UPDATE batches SET
    status = 'failed',
    finished_at = CASE
        WHEN failed_rows = 0 AND activation_error IS NULL THEN (
            SELECT recorded_at FROM events
            WHERE stream_id = 'batch-' || batches.batch_id AND event_type = 'BatchRollbackFailed'
            ORDER BY stream_version LIMIT 1
        )
        ELSE finished_at
    END
WHERE rollback_refused = 1 AND activated = 0;
