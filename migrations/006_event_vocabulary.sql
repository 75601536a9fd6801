-- No table changes. Code from before LogLossDetected and BatchActivationFailed's
-- activated_upstream_batch_ids cannot read those events: at this version it refuses the
-- database at start (exit 2), where it would otherwise fail on them later, on /status,
-- /events, resume or rollback. A change to an event's type or fields comes with a migration.
SELECT 1;
