-- keyward key database, SQLite. Timestamps are Unix epoch milliseconds (UTC).
-- The PostgreSQL schema (../postgres) has the same tables, columns and meaning.
CREATE TABLE api_keys (
    key_id        TEXT    PRIMARY KEY,
    key_hash      TEXT    NOT NULL UNIQUE,
    key_hint      TEXT    NOT NULL,
    apikey_uid    TEXT    NOT NULL,
    namespace     TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    owner         TEXT    NOT NULL,
    team          TEXT    NOT NULL,
    scopes        TEXT    NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('pending', 'active', 'retiring', 'revoked')),
    created_at    INTEGER NOT NULL,
    activated_at  INTEGER,
    expires_at    INTEGER,
    revoked_at    INTEGER,
    revoke_reason TEXT,
    issue_reason  TEXT    NOT NULL CHECK (issue_reason IN ('initial', 'secret_deleted', 'secret_altered', 'scheduled', 'requested', 'emergency')),
    rotation_request TEXT,
    CHECK ((state = 'revoked') = (revoked_at IS NOT NULL))
);

CREATE INDEX api_keys_by_apikey ON api_keys (apikey_uid, state);

CREATE TABLE key_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id  TEXT    NOT NULL REFERENCES api_keys (key_id),
    at      INTEGER NOT NULL,
    action  TEXT    NOT NULL CHECK (action IN ('issued', 'activated', 'metadata_changed', 'expiry_changed', 'retired', 'revoked')),
    detail  TEXT    NOT NULL
);

CREATE INDEX key_audit_by_key ON key_audit (key_id, id);

-- The audit trail is append-only.
CREATE TRIGGER key_audit_no_update BEFORE UPDATE ON key_audit
BEGIN SELECT RAISE(ABORT, 'key_audit is append-only'); END;
CREATE TRIGGER key_audit_no_delete BEFORE DELETE ON key_audit
BEGIN SELECT RAISE(ABORT, 'key_audit is append-only'); END;
