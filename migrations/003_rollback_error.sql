-- Why the last rollback of a batch failed (BatchRollbackFailed), until it is asked for again.
ALTER TABLE batches ADD COLUMN rollback_error TEXT;
