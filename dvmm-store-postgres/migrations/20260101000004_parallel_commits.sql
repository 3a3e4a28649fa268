-- Appends commit in parallel; readers still never pass a position that
-- commits later.
--
-- Before: `dvmm_append` held a transaction-scoped advisory lock from drawing
-- its positions until its commit, so appends committed one at a time and
-- never shared a WAL flush.
--
-- Now an append first takes a *marker*: a shared, transaction-scoped
-- advisory lock whose 64-bit key is the sequence's next value as read before
-- the insert, i.e. a value no higher than any position the append will draw
-- (the sequence only grows and has no per-session cache). PostgreSQL drops the
-- marker when the append commits or rolls back. No lock is held across the
-- insert or the commit, so appends commit in parallel and share WAL flushes.
--
-- `dvmm_read_all` computes a bound in two steps, in this order: the sequence's
-- next value, then the lowest marker in this database; the bound is the lower
-- of the two. An append that had drawn a position below the first value had
-- marked before drawing, so if it is still running its marker (no higher than
-- its positions) is seen by the second step; an append that draws later gets
-- positions at or above the bound. The rows are then read with a newer
-- snapshot (READ COMMITTED takes one per statement) and only those below the
-- bound are returned, so a committed append is always visible in full and a
-- running one is never passed.
--
-- Markers are ordinary advisory locks with 64-bit keys below 2^48 (the
-- positions). An application lock in the same database with such a key would
-- look like a running append: `read_all` would hold back at that position
-- (never skip) until it is released. The position sequence must keep
-- `CACHE 1` (the default): a per-session cache would hand out values below
-- ones already read.

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

    -- The marker: no higher than any position the insert below will draw.
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

    -- First the next position, then the markers: see the header.
    v_bound := coalesce(pg_sequence_last_value('dvmm_events_position_seq'), 0) + 1;
    SELECT least(v_bound, min((l.classid::bigint << 32) | l.objid::bigint))
      INTO v_bound
      FROM pg_locks l
     WHERE l.locktype = 'advisory'
       AND l.objsubid = 1
       AND l.classid < 65536
       AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database());

    RETURN QUERY
        SELECT * FROM dvmm_events e
         WHERE e.tenant_id = p_tenant AND e.position > p_after AND e.position < v_bound
         ORDER BY e.position
         LIMIT p_limit;
END
$$;

-- The reader's bound reads the sequence's position.
GRANT SELECT ON SEQUENCE dvmm_events_position_seq TO dvmm_app;
