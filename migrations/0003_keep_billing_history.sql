-- Billing history outlives its users: a user with usage rows can no longer be deleted (and its
-- rows erased with it, as ON DELETE CASCADE did); deactivate the user instead. A deleted key's
-- rows stay, billed to the user, with api_key_id NULL (ON DELETE SET NULL, unchanged).
-- depends: 0001_initial

ALTER TABLE usage DROP CONSTRAINT usage_user_id_fkey;
ALTER TABLE usage ADD CONSTRAINT usage_user_id_fkey
    FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE RESTRICT;
