-- This database's own namespace for the batch ids it derives from Idempotency-Keys. Fixed
-- in the code, it gave the same key the same batch id, and the same directory batch, in
-- every deployment that used it: one's rollback then deleted another's hospitals.
CREATE TABLE instance (
    id                    INTEGER PRIMARY KEY CHECK (id = 1),
    idempotency_namespace TEXT    NOT NULL
);
INSERT INTO instance (id, idempotency_namespace) VALUES (1, lower(hex(randomblob(16))));
