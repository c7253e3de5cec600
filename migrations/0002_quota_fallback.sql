-- The quota's PostgreSQL fallback: a cheap month sum and a record of who was served in it.
-- depends: 0001_initial

-- Covering index: the month's sum of a user is an index-only scan (no heap visits).
CREATE INDEX usage_user_created_count_idx ON usage (user_id, created_at) INCLUDE (embeddings_count);
DROP INDEX usage_user_created_idx;

-- Users whose quota was decided in PostgreSQL this month (app/serving/quota.py explains). Every
-- process reads it about once a second and decides those users in PostgreSQL too, so
-- processes split between Redis and PostgreSQL never both allow the rest.
CREATE TABLE quota_fallback (
    id          BIGSERIAL PRIMARY KEY,
    user_id     BIGINT NOT NULL,
    month       DATE NOT NULL,
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),  -- start of this stretch in PostgreSQL
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),  -- the latest decision there
    UNIQUE (month, user_id)
);
