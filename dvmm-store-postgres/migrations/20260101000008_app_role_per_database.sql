-- The application's group role belongs to one database.
--
-- Until now every dvmm database granted its tables to the cluster-wide group
-- role `dvmm_app`, so a login made for database X (a member of `dvmm_app`)
-- was let in and passed the store's role check in database Y of the same
-- cluster, and read Y's tenants there.
--
-- Now each database has its own NOLOGIN group role, named after the database:
-- `dvmm_app_<database>` when the name is a plain lowercase identifier short
-- enough, else `dvmm_app_<cleaned name, cut>_<first 8 hex digits of md5 of
-- the name>`. The name is recorded once, here, in the function
-- `dvmm_app_role()`, so renaming the database later changes nothing. The role
-- gets what `dvmm_app` had in this database, plus CONNECT on it; `dvmm_app`
-- loses everything here. `create_app_login` grants the database's role, and
-- the store's role check requires membership in it.
--
-- Upgrading: logins made before this migration are members of `dvmm_app`
-- only, which no longer opens this database. Run `create_app_login` again for
-- each of them (or `GRANT <dvmm_app_role()> TO <login>`) before starting the
-- new processes.
--
-- A role of that name that already exists (a database of the same name that
-- was dropped and created again) is reused, but only if it is a plain
-- NOLOGIN role without SUPERUSER, CREATEROLE or BYPASSRLS; anything else
-- stops the migration.

DO $$
DECLARE
    v_db text := current_database();
    v_clean text := regexp_replace(lower(v_db), '[^a-z0-9_]', '_', 'g');
    v_role text := 'dvmm_app_' || v_clean;
    v_unsafe boolean;
BEGIN
    IF v_clean <> v_db OR length(v_role) > 63 THEN
        v_role := left(v_role, 54) || '_' || left(md5(v_db), 8);
    END IF;
    BEGIN
        EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
    EXCEPTION
        WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    SELECT r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolbypassrls
      INTO v_unsafe
      FROM pg_roles r
     WHERE r.rolname = v_role;
    IF v_unsafe THEN
        RAISE EXCEPTION 'role % exists and is not a plain NOLOGIN group role', v_role
            USING ERRCODE = 'duplicate_object';
    END IF;

    EXECUTE format(
        'CREATE FUNCTION dvmm_app_role() RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE '
        'AS %L', format('SELECT %L::text', v_role));

    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', v_db, v_role);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), v_role);
    EXECUTE format('GRANT SELECT, INSERT ON dvmm_events, dvmm_timeline TO %I', v_role);
    EXECUTE format('GRANT SELECT ON dvmm_event_rows TO %I', v_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON dvmm_jobs, dvmm_checkpoints TO %I', v_role);
    EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE dvmm_events_position_seq TO %I', v_role);
    EXECUTE format('GRANT USAGE ON SEQUENCE dvmm_timeline_seq TO %I', v_role);
    EXECUTE format(
        'GRANT EXECUTE ON FUNCTION '
        'dvmm_append(uuid, text, text, bigint, uuid[], text[], bigint[], jsonb[], jsonb[], boolean), '
        'dvmm_load(uuid, text, text), dvmm_read_all(uuid, bigint, bigint) TO %I', v_role);

    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM dvmm_app', current_schema());
END
$$;

REVOKE ALL ON dvmm_events, dvmm_timeline, dvmm_event_rows, dvmm_jobs, dvmm_checkpoints FROM dvmm_app;
REVOKE ALL ON SEQUENCE dvmm_events_position_seq, dvmm_timeline_seq FROM dvmm_app;
REVOKE ALL ON FUNCTION
    dvmm_append(uuid, text, text, bigint, uuid[], text[], bigint[], jsonb[], jsonb[], boolean),
    dvmm_load(uuid, text, text),
    dvmm_read_all(uuid, bigint, bigint)
FROM dvmm_app;
