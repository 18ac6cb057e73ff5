-- How often each key is presented, per UTC hour and outcome, and since when
-- verifiers report it. The SQLite migration (../sqlite) has the same tables, columns and meaning.

-- Verifiers add their counts in batches (count = count + n), so replicas add
-- up. No foreign key: a restored database may lack a key a verifier counted,
-- and that must not fail the whole batch. The operator prunes old hours.
CREATE TABLE key_usage (
    key_id  TEXT    NOT NULL,
    hour    BIGINT NOT NULL,
    outcome TEXT    NOT NULL CHECK (outcome IN ('valid', 'insufficient_scope', 'revoked', 'expired')),
    count   BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, outcome)
);

-- The operator's scans read recent hours; pruning deletes old ones.
CREATE INDEX key_usage_by_hour ON key_usage (hour);

-- One row: when a verifier first and last flushed (with or without uses).
-- lifetime.maxUnused judges a key unused only while verifiers report and have
-- reported for the whole window: no data is not "unused".
CREATE TABLE usage_reporting (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    first_reported_at BIGINT NOT NULL,
    last_reported_at  BIGINT NOT NULL
);
