-- Indexes for the operator's two scans over many ApiKeys.
-- The SQLite migration (../sqlite) is the same.

-- maxKeysPerNamespace counts the ApiKeys that hold a live key in a namespace,
-- under a lock, before each first issue there.
CREATE INDEX api_keys_live_by_namespace ON api_keys (namespace, apikey_uid) WHERE state <> 'revoked';

-- The first use of a key reaches status.lastUsedAt within a minute or two: the
-- operator asks for the keys used since its last look.
CREATE INDEX api_keys_by_last_use ON api_keys (last_used_at) WHERE last_used_at IS NOT NULL;
