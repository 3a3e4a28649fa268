-- The request read model (dvmm_core::read_model): one row per request, kept
-- up by the service, listed newest first by (created_at, request_id) and
-- filtered by status and project. Tenants are kept apart by row-level
-- security as the events are, and every statement also names the tenant.
-- A row carries its request stream's version; an upsert with an older (or
-- the same) version changes nothing.

CREATE TABLE dvmm_requests (
    tenant_id      uuid        NOT NULL,
    request_id     uuid        NOT NULL,
    project_id     uuid        NOT NULL,
    project_prefix text        NOT NULL,
    vm_name        text        NOT NULL,
    size           text        NOT NULL,
    status         text        NOT NULL,
    vm_id          uuid,
    ip_address     text,
    reason         text,
    created_at     timestamptz NOT NULL,
    created_nanos  integer     NOT NULL,
    updated_at     timestamptz NOT NULL,
    updated_nanos  integer     NOT NULL,
    version        bigint      NOT NULL,
    PRIMARY KEY (tenant_id, request_id)
);

-- Newest first within a tenant; the filters narrow the same order.
CREATE INDEX dvmm_requests_list ON dvmm_requests (tenant_id, created_at DESC, created_nanos DESC, request_id DESC);
CREATE INDEX dvmm_requests_by_status ON dvmm_requests (tenant_id, status, created_at DESC);
CREATE INDEX dvmm_requests_by_project ON dvmm_requests (tenant_id, project_id, created_at DESC);

ALTER TABLE dvmm_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE dvmm_requests FORCE ROW LEVEL SECURITY;
CREATE POLICY dvmm_requests_tenant_isolation ON dvmm_requests
    USING (tenant_id::text = current_setting('dvmm.tenant_id', true))
    WITH CHECK (tenant_id::text = current_setting('dvmm.tenant_id', true));

DO $$
BEGIN
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON dvmm_requests TO %I', dvmm_app_role());
END
$$;
