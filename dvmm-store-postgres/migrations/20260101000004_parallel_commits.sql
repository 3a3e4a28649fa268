-- Appends commit in parallel; readers still never pass a position that
-- commits later.
--
-- Before: `dvmm_append` held a transaction-scoped advisory lock from drawing
-- its positions until its commit, so appends committed one at a time and
-- never shared a WAL flush.
--
-- Now an append holds the ordering lock (session-scoped, key 'dvmm_evt') only
-- while it draws its positions and takes a *marker*: a transaction-scoped
-- advisory lock whose 64-bit key is its first position. The marker is
-- released by PostgreSQL when the append commits or rolls back. The insert
-- and the commit run after the ordering lock is released, in parallel with
-- other appends.
--
-- `dvmm_read_all` first computes the safe bound: the lowest marker in this
-- database, or the next position to be drawn when there is none, read while
-- holding the ordering lock in shared mode (so no append is between drawing
-- and marking). Every position below the bound belongs to an append that
-- had ended when the bound was read. The rows are then read with a newer
-- snapshot (READ COMMITTED takes one per statement) and only those below the
-- bound are returned, so a committed append is always visible in full and a
-- running one is never passed.
--
-- Markers are ordinary advisory locks with 64-bit keys below 2^48 (the
-- positions). An application lock in the same database with such a key would
-- look like a running append: `read_all` would hold back at that position
-- (never skip) until it is released.

CREATE OR REPLACE FUNCTION dvmm_append(
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
    v_positions bigint[];
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

    -- A session lock outlives an error, so every way out of this block
    -- releases it.
    PERFORM pg_advisory_lock(7239093767563998836);
    BEGIN
        SELECT array_agg(s.p ORDER BY s.p) INTO v_positions
          FROM (SELECT nextval('dvmm_events_position_seq') AS p
                  FROM generate_series(1, v_count)) s;
        PERFORM pg_advisory_xact_lock(v_positions[1]);
    EXCEPTION
        WHEN OTHERS OR query_canceled THEN
            PERFORM pg_advisory_unlock(7239093767563998836);
            RAISE;
    END;
    PERFORM pg_advisory_unlock(7239093767563998836);

    INSERT INTO dvmm_events
        (position, stream_type, stream_id, version, tenant_id, event_id, event_type,
         schema_version, payload, metadata)
    OVERRIDING SYSTEM VALUE
    SELECT v_positions[b.ord], p_stream_type, p_stream_id, v_current + b.ord, p_tenant,
           b.event_id, b.event_type, b.schema_version, b.payload, b.metadata
      FROM unnest(p_event_ids, p_event_types, p_schema_versions, p_payloads, p_metadata)
             WITH ORDINALITY AS b(event_id, event_type, schema_version, payload, metadata, ord)
     ORDER BY b.ord;

    RETURN QUERY SELECT 'appended'::text, v_current + v_count, v_positions[v_count];
END
$$;

CREATE OR REPLACE FUNCTION dvmm_read_all(p_tenant uuid, p_after bigint, p_limit bigint)
RETURNS SETOF dvmm_events
LANGUAGE plpgsql
AS $$
DECLARE
    v_bound bigint;
BEGIN
    -- The bound is only safe if the rows are read with a later snapshot.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'dvmm_read_all needs READ COMMITTED, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported';
    END IF;
    PERFORM set_config('dvmm.tenant_id', p_tenant::text, true);

    PERFORM pg_advisory_lock_shared(7239093767563998836);
    BEGIN
        SELECT coalesce(
                   min((l.classid::bigint << 32) | l.objid::bigint),
                   coalesce(pg_sequence_last_value('dvmm_events_position_seq'), 0) + 1)
          INTO v_bound
          FROM pg_locks l
         WHERE l.locktype = 'advisory'
           AND l.objsubid = 1
           AND l.classid < 65536
           AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());
    EXCEPTION
        WHEN OTHERS OR query_canceled THEN
            PERFORM pg_advisory_unlock_shared(7239093767563998836);
            RAISE;
    END;
    PERFORM pg_advisory_unlock_shared(7239093767563998836);

    RETURN QUERY
        SELECT * FROM dvmm_events e
         WHERE e.tenant_id = p_tenant AND e.position > p_after AND e.position < v_bound
         ORDER BY e.position
         LIMIT p_limit;
END
$$;

-- The reader's bound reads the sequence's position.
GRANT SELECT ON SEQUENCE dvmm_events_position_seq TO dvmm_app;
