-- Several clusters may share one key database: each record and audit row names
-- the cluster whose operator wrote it (`keyward run --cluster-name`).
-- The SQLite migration (../sqlite) has the same tables, columns and meaning.

-- NULL only on rows written before this migration, until the first cluster
-- registers (below) and claims them.
ALTER TABLE api_keys ADD COLUMN cluster TEXT;
ALTER TABLE key_audit ADD COLUMN cluster TEXT;

-- One row per cluster name: the kube-system Namespace uid of the Kubernetes
-- cluster that uses it. An operator refuses to start when its name belongs to
-- another cluster, or when its cluster is registered under another name.
CREATE TABLE key_clusters (
    name            TEXT   PRIMARY KEY,
    kube_system_uid TEXT   NOT NULL UNIQUE,
    registered_at   BIGINT NOT NULL
);

-- maxKeysPerNamespace counts the live rows of one cluster in a namespace. The
-- namespace leads: with the cluster first, SQLite would pick this index for
-- the reconciler's load by ApiKey uid and scan every row of the cluster.
DROP INDEX api_keys_live_by_namespace;
CREATE INDEX api_keys_live_by_namespace_and_cluster ON api_keys (namespace, cluster, apikey_uid) WHERE state <> 'revoked';

-- The audit trail stays append-only, with one exception: a row from before this
-- migration is given its cluster once, and nothing else of it changes.
CREATE OR REPLACE FUNCTION key_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.cluster IS NULL AND NEW.cluster IS NOT NULL
       AND NEW.id = OLD.id AND NEW.key_id = OLD.key_id AND NEW.at = OLD.at
       AND NEW.action = OLD.action AND NEW.detail = OLD.detail THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'key_audit is append-only';
END;
$$;
