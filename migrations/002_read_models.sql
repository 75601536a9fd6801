-- Read models: rebuilt from the log at will, updated in the same transaction as each append.
CREATE TABLE batches (
    batch_id            TEXT    PRIMARY KEY,
    file_name           TEXT    NOT NULL,
    idempotency_key     TEXT    UNIQUE,
    content_sha256      TEXT    NOT NULL,
    total_rows          INTEGER NOT NULL,
    created_rows        INTEGER NOT NULL DEFAULT 0,
    failed_rows         INTEGER NOT NULL DEFAULT 0,
    deleted_rows        INTEGER NOT NULL DEFAULT 0,
    requested           INTEGER NOT NULL DEFAULT 0,
    activated           INTEGER NOT NULL DEFAULT 0,
    activation_error    TEXT,
    rollback_requested  INTEGER NOT NULL DEFAULT 0,
    rolled_back         INTEGER NOT NULL DEFAULT 0,
    status              TEXT    NOT NULL,
    stream_version      INTEGER NOT NULL,
    last_position       INTEGER NOT NULL,
    created_at          TEXT    NOT NULL,
    updated_at          TEXT    NOT NULL,
    finished_at         TEXT
);
CREATE INDEX batches_by_creation ON batches (created_at DESC, batch_id DESC);
CREATE INDEX batches_by_status ON batches (status, created_at DESC, batch_id DESC);

CREATE TABLE batch_rows (
    batch_id          TEXT    NOT NULL REFERENCES batches (batch_id),
    row               INTEGER NOT NULL,
    line              INTEGER NOT NULL,
    name              TEXT    NOT NULL,
    address           TEXT    NOT NULL,
    phone             TEXT,
    creation_batch_id TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    hospital_id       INTEGER,
    error_reason      TEXT,
    error_message     TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    reconciled        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, row)
) WITHOUT ROWID;

-- The log position each projection has applied, for rebuilds and checks.
CREATE TABLE projection_checkpoints (
    name     TEXT    PRIMARY KEY,
    position INTEGER NOT NULL
);
