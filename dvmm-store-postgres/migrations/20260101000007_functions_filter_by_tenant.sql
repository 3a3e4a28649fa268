-- The SQL functions name the tenant themselves, not only through row-level
-- security.
--
-- Until now the tenant policy was the only thing that kept `dvmm_load` and
-- the stream lookups of `dvmm_append` to the caller's tenant. A pool whose
-- role escapes the policies (a superuser, a role with BYPASSRLS, or the
-- tables' owner with `row_security` off) loaded another tenant's stream and
-- took its version as the caller's. Each lookup now also compares the row's
-- tenant with the function's `p_tenant`, so such a pool still sees only the
-- caller's rows; the policy remains the layer that holds for raw SQL.
--
-- The tenant is compared as text, like the policy of migration 6: no index
-- matches that expression, so the planner keeps answering a stream lookup
-- from the (stream_type, stream_id, version) index (the append's fast path
-- still reads one index entry) and never from the (tenant_id, position)
-- index, which would read a whole tenant. `dvmm_read_all` already names the
-- tenant in its query (its index needs it) and is unchanged.
--
-- The functions keep their signatures, so the grants of migrations 5 and 6
-- stay in force.

CREATE OR REPLACE FUNCTION dvmm_append(
    p_tenant uuid,
    p_stream_type text,
    p_stream_id text,
    p_expected bigint,
    p_event_ids uuid[],
    p_event_types text[],
    p_schema_versions bigint[],
    p_payloads jsonb[],
    p_metadata jsonb[],
    p_check_ids boolean
)
RETURNS TABLE (outcome text, stream_version bigint, last_position bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    v_count bigint := coalesce(cardinality(p_event_ids), 0);
    v_tenant text := p_tenant::text;
    v_current bigint;
    v_known bigint;
    v_last bigint;
BEGIN
    PERFORM set_config('dvmm.tenant_id', v_tenant, true);
    IF NOT p_check_ids AND v_count > 0 THEN
        -- ORDER BY … LIMIT 1 rather than max(): see migration 6.
        SELECT coalesce((SELECT e.version
                           FROM dvmm_events e
                          WHERE e.stream_type = p_stream_type AND e.stream_id = p_stream_id
                            AND e.tenant_id::text = v_tenant
                          ORDER BY e.version DESC
                          LIMIT 1), 0)
          INTO v_current;
    END IF;
    IF p_check_ids OR v_count = 0 OR v_current <> p_expected THEN
        -- One statement, one snapshot (migration 6).
        SELECT (SELECT coalesce(max(e.version), 0)
                  FROM dvmm_events e
                 WHERE e.stream_type = p_stream_type AND e.stream_id = p_stream_id
                   AND e.tenant_id::text = v_tenant),
               (SELECT count(*) FILTER (WHERE e.stream_type = p_stream_type
                                          AND e.stream_id = p_stream_id)
                  FROM dvmm_events e
                 WHERE e.event_id = ANY (p_event_ids)
                   AND e.tenant_id::text = v_tenant)
          INTO v_current, v_known;
        -- A retry after a lost acknowledgement carries the first attempt's
        -- expected version: recognise it before comparing versions.
        IF v_count > 0 AND v_known = v_count THEN
            RETURN QUERY SELECT 'already_applied'::text, v_current, NULL::bigint;
            RETURN;
        END IF;
        IF v_known > 0 OR v_current <> p_expected THEN
            RETURN QUERY SELECT 'conflict'::text, v_current, NULL::bigint;
            RETURN;
        END IF;
        IF v_count = 0 THEN
            RETURN QUERY SELECT 'appended'::text, v_current, 0::bigint;
            RETURN;
        END IF;
    END IF;
    -- The marker (migration 4): no higher than any position the insert below
    -- will draw.
    PERFORM pg_advisory_xact_lock_shared(
        coalesce(pg_sequence_last_value('dvmm_events_position_seq'), 0) + 1);
    WITH inserted AS (
        INSERT INTO dvmm_events
            (stream_type, stream_id, version, tenant_id, event_id, event_type,
             schema_version, payload, metadata)
        SELECT p_stream_type, p_stream_id, v_current + b.ord, p_tenant, b.event_id, b.event_type,
               b.schema_version, b.payload, b.metadata
          FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata)
                 WITH ORDINALITY AS b(event_id, event_type, schema_version, payload, metadata, ord)
         ORDER BY b.ord
        RETURNING position
    )
    SELECT max(i.position) INTO v_last FROM inserted i;
    RETURN QUERY SELECT 'appended'::text, v_current + v_count, v_last;
END
$$;

CREATE OR REPLACE FUNCTION dvmm_load(p_tenant uuid, p_stream_type text, p_stream_id text)
RETURNS SETOF dvmm_event_rows
LANGUAGE plpgsql
AS $$
DECLARE
    v_tenant text := p_tenant::text;
BEGIN
    PERFORM set_config('dvmm.tenant_id', v_tenant, true);
    RETURN QUERY
        SELECT * FROM dvmm_event_rows e
         WHERE e.stream_type = p_stream_type AND e.stream_id = p_stream_id
           AND e.tenant_id::text = v_tenant
         ORDER BY e.version;
END
$$;
