#!/usr/bin/env bash
# Dump the Smally database (DATABASE_URL from the app's .env) to a gzip file in the backup
# directory and keep the newest 30. Run daily by smally-backup.timer (as the smally user), or by
# hand: `sudo systemctl start smally-backup` (what `make backup` does).
#
#   backup.sh            prints the path of the new backup on stdout
#
# SMALLY_BACKUP_DIR (default /home/smally/backups) and SMALLY_BACKUP_KEEP (default 30) override.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

keep=${SMALLY_BACKUP_KEEP:-30}
database_url=$(env_value DATABASE_URL)
libpq_url "$database_url"
[ -n "$database_url" ] || die "DATABASE_URL is not set in $SMALLY_ENV_FILE"
command -v pg_dump >/dev/null || die "pg_dump is missing (apt-get install postgresql-client)"
[ -d "$SMALLY_BACKUP_DIR" ] || die "no backup directory $SMALLY_BACKUP_DIR"

umask 077
stamp=$(date -u +%Y%m%dT%H%M%SZ)
target="$SMALLY_BACKUP_DIR/smally-$stamp.sql.gz"
partial="$target.partial"
trap 'rm -f "$partial"' EXIT

# Plain SQL without owners or grants: restore.sh loads it as the application's role.
pg_dump --dbname="$database_url" --no-owner --no-privileges --quote-all-identifiers |
    gzip -6 >"$partial"
gzip -t "$partial"
mv "$partial" "$target"
trap - EXIT

# Keep the newest $keep (names sort by time).
find "$SMALLY_BACKUP_DIR" -maxdepth 1 -name 'smally-*.sql.gz' -printf '%f\n' | sort -r |
    tail -n +"$((keep + 1))" | while read -r old; do
    rm -f -- "${SMALLY_BACKUP_DIR:?}/$old"
done

echo "backup: $target ($(du -h "$target" | cut -f1))" >&2
echo "$target"
