-- Finished jobs are purged after the runner's retention
-- (`RunnerConfig::retention`): the app role may delete job rows, and the
-- purge finds the old done rows through their completion time (`updated_at`,
-- which nothing changes once a row is done) without scanning the rest.

CREATE INDEX dvmm_jobs_done_at ON dvmm_jobs (updated_at) WHERE state = 'done';

DO $$
BEGIN
    EXECUTE format('GRANT DELETE ON dvmm_jobs TO %I', dvmm_app_role());
END
$$;
