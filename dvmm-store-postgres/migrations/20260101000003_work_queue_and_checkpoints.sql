-- Work queue and feed checkpoints of the provisioning runner.
--
-- `dvmm_jobs` is shared by every worker process of a deployment. A job is
-- claimed with `FOR UPDATE SKIP LOCKED`, so concurrent claimers never wait on
-- each other and never take the same row; the claim is a lease that ends at
-- `due_at` unless renewed. Lease times come from the database clock (`now()`),
-- so workers on hosts with skewed clocks still agree on when a lease expired.
--
-- The queue is deliberately not under row-level security: claiming is a
-- cross-tenant operation (one worker serves every tenant), and a row holds
-- only ids and scheduling state, never tenant data. The runner reads the
-- events themselves through the tenant-scoped store.

CREATE TABLE dvmm_jobs (
    request_id   uuid        PRIMARY KEY,
    tenant_id    uuid        NOT NULL,
    -- 'queued': runnable from due_at; 'leased': held by worker until due_at;
    -- 'done': finished, kept so a re-fed approval is not queued again.
    state        text        NOT NULL CHECK (state IN ('queued', 'leased', 'done')),
    due_at       timestamptz,
    worker       text,
    attempts     integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claims       integer     NOT NULL DEFAULT 0 CHECK (claims >= 0),
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'done') = (due_at IS NULL)),
    CHECK ((state = 'leased') = (worker IS NOT NULL))
);

-- The claim scans: expired leases first (a dead worker's jobs are taken over
-- as soon as their lease ends, not after the backlog), then queued jobs by due
-- time. Done jobs leave both indexes.
CREATE INDEX dvmm_jobs_lease_ends ON dvmm_jobs (due_at) WHERE state = 'leased';
CREATE INDEX dvmm_jobs_queued_due ON dvmm_jobs (due_at) WHERE state = 'queued';

CREATE TABLE dvmm_checkpoints (
    name        text        NOT NULL,
    tenant_id   uuid        NOT NULL,
    position    bigint      NOT NULL CHECK (position >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, tenant_id)
);

-- Checkpoints are per tenant, so they follow the tenant policy like the events.
ALTER TABLE dvmm_checkpoints ENABLE ROW LEVEL SECURITY;
ALTER TABLE dvmm_checkpoints FORCE ROW LEVEL SECURITY;
CREATE POLICY dvmm_checkpoints_tenant_isolation ON dvmm_checkpoints
    USING (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = NULLIF(current_setting('dvmm.tenant_id', true), '')::uuid);

GRANT SELECT, INSERT, UPDATE ON dvmm_jobs, dvmm_checkpoints TO dvmm_app;
