DROP TABLE quota_fallback;
CREATE INDEX usage_user_created_idx ON usage (user_id, created_at);
DROP INDEX usage_user_created_count_idx;
