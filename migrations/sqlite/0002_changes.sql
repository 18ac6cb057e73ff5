-- The change sequence the verifier follows, and when each key was last used.
-- The PostgreSQL migration (../postgres) has the same tables, columns and meaning.

-- One row: the last change sequence number handed out. Every write to api_keys
-- takes the next number in the same transaction, so numbers follow commit order.
CREATE TABLE key_change_counter (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO key_change_counter (id, seq) VALUES (1, 0);

-- The change sequence number of the row's last write (0: before this migration).
ALTER TABLE api_keys ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX api_keys_by_change ON api_keys (change_seq);

-- The minute the key was last presented to a verifier; only ever moves forward.
ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
