-- Users, their API keys and the usage ledger.
-- depends:

CREATE TABLE users (
    id          BIGSERIAL PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE CHECK (email = lower(email)),
    tier        TEXT NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'scale')),
    is_active   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id            BIGSERIAL PRIMARY KEY,
    user_id       BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- SHA-256 of the whole key, hex; the plain key is never stored.
    key_hash      TEXT NOT NULL UNIQUE CHECK (length(key_hash) = 64),
    -- The first characters of the key, so people can tell their keys apart.
    key_prefix    TEXT NOT NULL,
    name          TEXT,
    is_active     BOOLEAN NOT NULL DEFAULT TRUE,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
CREATE INDEX api_keys_key_prefix_idx ON api_keys (key_prefix);

CREATE TABLE usage (
    id                BIGSERIAL PRIMARY KEY,
    user_id           BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    api_key_id        BIGINT REFERENCES api_keys (id) ON DELETE SET NULL,
    embeddings_count  INTEGER NOT NULL CHECK (embeddings_count > 0),
    tokens            INTEGER NOT NULL CHECK (tokens >= 0),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Monthly quota rebuilds and billing read one user's (or key's) rows for one month.
CREATE INDEX usage_user_created_idx ON usage (user_id, created_at);
CREATE INDEX usage_key_created_idx ON usage (api_key_id, created_at);
