-- dvmm event store and timeline.
--
-- Run by the admin (table-owning) connection through `dvmm_store_postgres::migrate`.
-- The application connects as a login role that is a member of `dvmm_app`, which
-- may only read and append; row-level security limits every statement of it to
-- the tenant named by the transaction setting `dvmm.tenant_id`.

-- Roles are cluster-wide while migrations run per database, so several
-- databases (or processes) may race to create it: losing the race is fine.
DO $$
BEGIN
    CREATE ROLE dvmm_app NOLOGIN;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO dvmm_app', current_schema());
END
$$;

CREATE TABLE dvmm_events (
    -- Global order. Assigned under a transaction-scoped advisory lock that is
    -- held until commit, so positions become visible in increasing order.
    position       bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME dvmm_events_position_seq) PRIMARY KEY,
    stream_type    text        NOT NULL,
    stream_id      text        NOT NULL,
    version        bigint      NOT NULL CHECK (version >= 1),
    tenant_id      uuid        NOT NULL,
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    schema_version bigint      NOT NULL CHECK (schema_version >= 0),
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    -- Optimistic concurrency. Deliberately not scoped by tenant: a tenant
    -- cannot claim a stream id that another tenant already uses.
    CONSTRAINT dvmm_events_stream_version_key UNIQUE (stream_type, stream_id, version),
    CONSTRAINT dvmm_events_event_id_key UNIQUE (event_id)
);

-- Loading a stream uses dvmm_events_stream_version_key; read_all uses this one.
CREATE INDEX dvmm_events_tenant_position_idx ON dvmm_events (tenant_id, position);

CREATE TABLE dvmm_timeline (
    event_id          uuid        PRIMARY KEY,
    tenant_id         uuid        NOT NULL,
    request_id        uuid        NOT NULL,
    entry_type        text        NOT NULL,
    details           text        NOT NULL,
    occurred_at       timestamptz NOT NULL,
    -- timestamptz keeps microseconds; the rest of the nanosecond fraction is
    -- kept here so that entries read back exactly as recorded.
    occurred_at_nanos integer     NOT NULL DEFAULT 0 CHECK (occurred_at_nanos BETWEEN 0 AND 999),
    -- Insertion order breaks ties between entries of the same instant.
    seq               bigint GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME dvmm_timeline_seq),
    recorded_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dvmm_timeline_request_idx
    ON dvmm_timeline (tenant_id, request_id, occurred_at, occurred_at_nanos, seq);

-- An unset setting reads as NULL (never set in this session) or '' (set by an
-- earlier transaction of a pooled connection); both match no row.
ALTER TABLE dvmm_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE dvmm_events FORCE ROW LEVEL SECURITY;
CREATE POLICY dvmm_events_tenant_isolation ON dvmm_events
    USING (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid);

ALTER TABLE dvmm_timeline ENABLE ROW LEVEL SECURITY;
ALTER TABLE dvmm_timeline FORCE ROW LEVEL SECURITY;
CREATE POLICY dvmm_timeline_tenant_isolation ON dvmm_timeline
    USING (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid);

-- Append-only: no UPDATE, DELETE or TRUNCATE for the application.
GRANT SELECT, INSERT ON dvmm_events, dvmm_timeline TO dvmm_app;
GRANT USAGE ON SEQUENCE dvmm_events_position_seq, dvmm_timeline_seq TO dvmm_app;
