-- tandem-center monitoring (tandem.center.monitor): what the engines said and when.
-- hypervisors.engine_url (0001) is the engine's monitor endpoint: tls://HOST:PORT.

-- Every event line an engine's monitor stream gave, and the state changes the center saw
-- (source 'center': reachable/unreachable). Append-only by use; pruned by age.
CREATE TABLE engine_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hypervisor_id  bigint NOT NULL REFERENCES hypervisors ON DELETE CASCADE,
    resource       text,
    event          text NOT NULL CHECK (length(event) BETWEEN 1 AND 100),
    engine_ts      timestamptz,                 -- the engine's clock, when it gave one
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    source         text NOT NULL DEFAULT 'engine' CHECK (source IN ('engine', 'center')),
    detail         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object')
);
CREATE INDEX ON engine_events (hypervisor_id, recorded_at DESC);
CREATE INDEX ON engine_events (resource, recorded_at DESC);

-- The last status of each resource as each engine reported it (one row per pair).
CREATE TABLE engine_resource_state (
    hypervisor_id   bigint NOT NULL REFERENCES hypervisors ON DELETE CASCADE,
    resource        text NOT NULL,
    role            text NOT NULL,
    connection      text NOT NULL,
    mode            text NOT NULL,             -- in-sync | syncing | degraded | standalone | split-brain
    rpo_bytes       bigint NOT NULL DEFAULT 0,
    rpo_seconds     double precision NOT NULL DEFAULT 0,
    last_rp_age_s   double precision,
    status          jsonb NOT NULL CHECK (jsonb_typeof(status) = 'object'),
    changed_at      timestamptz NOT NULL DEFAULT now(),   -- when mode/role/connection last changed
    seen_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hypervisor_id, resource)
);
