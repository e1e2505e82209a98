-- Per request: time before generation began (what a streaming client waits for its first token) and
-- generation time, so the observability API can report time-to-first-token and tokens/s.
ALTER TABLE requests ADD COLUMN time_to_first_token_ms INTEGER;
ALTER TABLE requests ADD COLUMN eval_ms INTEGER;
