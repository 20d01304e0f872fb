-- tandem-center catalogue, version 1.
-- Applied by tandem.center.migrate inside one transaction, under an advisory lock.
-- Names: lower-case identifiers that also work as Ansible/libvirt names.

CREATE DOMAIN tc_name AS text
    CHECK (VALUE ~ '^[a-z0-9][a-z0-9_.-]{0,62}$');

CREATE TABLE sites (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        tc_name NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE hypervisors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        tc_name NOT NULL UNIQUE,
    site_id     bigint NOT NULL REFERENCES sites ON DELETE RESTRICT,
    address     text NOT NULL,                 -- where Ansible and libvirt reach it
    engine_url  text,                          -- tandemd control endpoint, for monitoring
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON hypervisors (site_id);

CREATE TABLE protection_policies (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           tc_name NOT NULL UNIQUE,
    rp_interval_s  integer NOT NULL CHECK (rp_interval_s > 0),
    rp_retention   integer NOT NULL CHECK (rp_retention > 0),   -- recovery points kept per VM
    sync_timeout_s integer NOT NULL CHECK (sync_timeout_s >= 0),
    priority       integer NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE protected_vms (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                tc_name NOT NULL UNIQUE,
    production_site_id  bigint NOT NULL REFERENCES sites ON DELETE RESTRICT,
    dr_site_id          bigint NOT NULL REFERENCES sites ON DELETE RESTRICT,
    hypervisor_id       bigint REFERENCES hypervisors ON DELETE RESTRICT,
    policy_id           bigint NOT NULL REFERENCES protection_policies ON DELETE RESTRICT,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (production_site_id <> dr_site_id)
);
CREATE INDEX ON protected_vms (policy_id);

-- A VM's replicated disks: tandemd resource + volume number, and the guest's disk target.
CREATE TABLE vm_volumes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id       bigint NOT NULL REFERENCES protected_vms ON DELETE CASCADE,
    resource    tc_name NOT NULL,
    volume      integer NOT NULL CHECK (volume BETWEEN 0 AND 65535),
    target_dev  text NOT NULL CHECK (target_dev ~ '^[a-z][a-z0-9]{0,15}$'),
    size_bytes  bigint NOT NULL CHECK (size_bytes > 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (resource, volume),
    UNIQUE (vm_id, target_dev)
);

-- Documents validated by the API (tandem.center.models); the database checks the shape only.
CREATE TABLE network_mappings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        tc_name NOT NULL UNIQUE,
    document    jsonb NOT NULL CHECK (jsonb_typeof(document) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recovery_plans (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                tc_name NOT NULL UNIQUE,
    network_mapping_id  bigint REFERENCES network_mappings ON DELETE RESTRICT,
    document            jsonb NOT NULL CHECK (jsonb_typeof(document) = 'object'),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- As reported by the engines. (vm, site, name) is unique so that a re-report is a no-op.
CREATE TABLE recovery_points (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vm_id        bigint NOT NULL REFERENCES protected_vms ON DELETE CASCADE,
    site_id      bigint NOT NULL REFERENCES sites ON DELETE RESTRICT,
    name         text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    taken_at     timestamptz NOT NULL,
    consistency  text NOT NULL CHECK (consistency IN ('crash', 'filesystem')),
    reported_at  timestamptz NOT NULL DEFAULT now(),
    reported_by  text NOT NULL,
    UNIQUE (vm_id, site_id, name)
);
CREATE INDEX ON recovery_points (vm_id, taken_at DESC);

CREATE TABLE runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('failover', 'failback', 'drill')),
    plan_id      bigint REFERENCES recovery_plans ON DELETE RESTRICT,
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'succeeded', 'failed', 'aborted')),
    parameters   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(parameters) = 'object'),
    result       jsonb CHECK (result IS NULL OR jsonb_typeof(result) = 'object'),
    started_by   text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    CHECK ((state = 'running') = (finished_at IS NULL))
);
CREATE INDEX ON runs (started_at DESC);

CREATE TABLE run_steps (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       bigint NOT NULL REFERENCES runs ON DELETE CASCADE,
    seq          integer NOT NULL CHECK (seq > 0),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    status       text NOT NULL CHECK (status IN ('ok', 'changed', 'skipped', 'failed')),
    started_at   timestamptz,
    finished_at  timestamptz,
    detail       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, seq)
);

-- One open (raised or acknowledged) alert per dedup key; a cleared one is history.
CREATE TABLE alerts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dedup_key     text NOT NULL CHECK (length(dedup_key) BETWEEN 1 AND 300),
    kind          text NOT NULL,
    severity      text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    state         text NOT NULL DEFAULT 'raised' CHECK (state IN ('raised', 'acknowledged', 'cleared')),
    subject       text NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    raised_at     timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    acked_at      timestamptz,
    acked_by      text,
    cleared_at    timestamptz,
    CHECK ((state = 'cleared') = (cleared_at IS NOT NULL))
);
CREATE UNIQUE INDEX alerts_open_dedup_key ON alerts (dedup_key) WHERE state <> 'cleared';
CREATE INDEX ON alerts (raised_at DESC);

-- Who, what, when, inputs (secrets redacted), result. Append-only: see the triggers below.
CREATE TABLE audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor   text NOT NULL,
    action  text NOT NULL,
    target  text,
    inputs  jsonb NOT NULL DEFAULT '{}',
    ok      boolean NOT NULL,
    result  jsonb NOT NULL DEFAULT '{}'
);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- API tokens: only the SHA-256 of the (256-bit random) token is stored.
CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          tc_name NOT NULL UNIQUE,
    role          text NOT NULL CHECK (role IN ('read-only', 'operator', 'admin')),
    token_sha256  bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);
