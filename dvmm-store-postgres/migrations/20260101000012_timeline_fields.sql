-- Timeline entries carry their structured facts (actor, IP, error code, ...)
-- beside the English text, as JSON; entries recorded before have none.
ALTER TABLE dvmm_timeline ADD COLUMN fields jsonb NOT NULL DEFAULT '{}'::jsonb;
