-- Append, load and read_all as one statement each.
--
-- Called outside an explicit transaction, each call is its own implicit
-- transaction: one round trip instead of BEGIN / check / insert / COMMIT, and
-- the advisory lock that orders positions is held only for the insert and
-- the commit, never across a network round trip.
--
-- The functions are SECURITY INVOKER (the default): they run with the
-- caller's rights, so row-level security applies to every statement in them.
-- Each first sets the transaction-local tenant that the policies read.

CREATE FUNCTION dvmm_append(
    p_tenant uuid,
    p_stream_type text,
    p_stream_id text,
    p_expected bigint,
    p_event_ids uuid[],
    p_event_types text[],
    p_schema_versions bigint[],
    p_payloads jsonb[],
    p_metadata jsonb[]
)
RETURNS TABLE (outcome text, stream_version bigint, last_position bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    v_count bigint := coalesce(cardinality(p_event_ids), 0);
    v_current bigint;
    v_known bigint;
    v_last bigint;
BEGIN
    PERFORM set_config('dvmm.tenant_id', p_tenant::text, true);

    -- One statement, one snapshot: under READ COMMITTED two statements
    -- could straddle a racing writer's commit and see its events but not
    -- its version.
    SELECT coalesce(max(e.version), 0),
           count(*) FILTER (WHERE e.event_id = ANY (p_event_ids))
      INTO v_current, v_known
      FROM dvmm_events e
     WHERE e.stream_type = p_stream_type AND e.stream_id = p_stream_id AND e.tenant_id = p_tenant;

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

    -- Serializes position assignment until commit (key: the bytes of
    -- 'dvmm_evt'). A position is drawn only after every transaction holding a
    -- lower one has ended, so positions become visible in increasing order.
    PERFORM pg_advisory_xact_lock(7239093767563998836);

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

CREATE FUNCTION dvmm_load(p_tenant uuid, p_stream_type text, p_stream_id text)
RETURNS SETOF dvmm_events
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM set_config('dvmm.tenant_id', p_tenant::text, true);
    RETURN QUERY
        SELECT * FROM dvmm_events e
         WHERE e.stream_type = p_stream_type AND e.stream_id = p_stream_id AND e.tenant_id = p_tenant
         ORDER BY e.version;
END
$$;

CREATE FUNCTION dvmm_read_all(p_tenant uuid, p_after bigint, p_limit bigint)
RETURNS SETOF dvmm_events
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM set_config('dvmm.tenant_id', p_tenant::text, true);
    RETURN QUERY
        SELECT * FROM dvmm_events e
         WHERE e.tenant_id = p_tenant AND e.position > p_after
         ORDER BY e.position
         LIMIT p_limit;
END
$$;

REVOKE EXECUTE ON FUNCTION
    dvmm_append(uuid, text, text, bigint, uuid[], text[], bigint[], jsonb[], jsonb[]),
    dvmm_load(uuid, text, text),
    dvmm_read_all(uuid, bigint, bigint)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    dvmm_append(uuid, text, text, bigint, uuid[], text[], bigint[], jsonb[], jsonb[]),
    dvmm_load(uuid, text, text),
    dvmm_read_all(uuid, bigint, bigint)
TO dvmm_app;
