ALTER TABLE usage DROP CONSTRAINT usage_user_id_fkey;
ALTER TABLE usage ADD CONSTRAINT usage_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE;
