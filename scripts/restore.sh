#!/usr/bin/env bash
# Restore a backup made by backup.sh. Run as root on the server:
#
#   sudo /home/smally/smally-api/scripts/restore.sh /home/smally/backups/smally-...sql.gz [--yes]
#
# 1. loads the backup into a fresh database (<name>_restore, owned by the app's role) while the
#    service still runs, connected as that role (common.sh's load_dump: the file is untrusted):
#    a backup that does not load changes nothing;
# 2. asks for confirmation (unless --yes), stops the service, renames the current database to
#    <name>_pre_restore_<time> (kept: drop it yourself once satisfied) and the fresh one into its
#    place, forgets Smally's Redis keys in both Redis servers (quota counters are rebuilt from the
#    restored ledger, cached vectors refill), starts the service and waits for /health.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { die "usage: restore.sh BACKUP.sql.gz [--yes]"; }
backup="" yes=no
for arg in "$@"; do
    case "$arg" in
    --yes | -y) yes=yes ;;
    -*) usage ;;
    *) [ -z "$backup" ] || usage; backup=$arg ;;
    esac
done
[ -n "$backup" ] || usage
[ "$(id -u)" == 0 ] || die "run as root (it stops and starts $SMALLY_SERVICE and uses the postgres account)"
[ -r "$backup" ] || die "cannot read $backup"
gzip -t "$backup" || die "$backup is not a valid gzip file"

database_url=$(env_value DATABASE_URL)
libpq_url "$database_url"
counters_url=$(env_value REDIS_URL)
cache_url=$(env_value CACHE_REDIS_URL)
redis_prefix=$(env_value REDIS_KEY_PREFIX "smally:")
command -v redis-cli >/dev/null ||
    die "redis-cli is missing (apt-get install redis-tools): a restore must clear Smally's Redis keys"
health=$(health_url)
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

read -r db role < <(psql -X -At -F ' ' "$database_url" -c 'SELECT current_database(), current_user') ||
    die "cannot connect with DATABASE_URL from $SMALLY_ENV_FILE"
fresh="${db}_restore"
previous="${db}_pre_restore_$(date -u +%Y%m%d%H%M%S)"

echo "restore: loading $backup into a fresh database $fresh" >&2
as_postgres dropdb --if-exists "$fresh"
as_postgres createdb --owner="$role" "$fresh"
# Connected as the app's role (DATABASE_URL, another database): everything restored belongs to
# it, and nothing in the file runs with more rights than the service has.
case "$database_url" in
*\?*) fresh_url="$database_url&dbname=$fresh" ;;
*) fresh_url="$database_url?dbname=$fresh" ;;
esac
if ! load_dump "$fresh_url" "$backup"; then
    as_postgres dropdb --if-exists "$fresh"
    die "the backup did not load; nothing was changed"
fi

if [ "$yes" != yes ]; then
    read -r -p "Replace database $db with $backup? $SMALLY_SERVICE stops meanwhile. [y/N] " answer
    case "$answer" in
    y | Y | yes) ;;
    *)
        as_postgres dropdb --if-exists "$fresh"
        die "cancelled; nothing was changed"
        ;;
    esac
fi

echo "restore: stopping $SMALLY_SERVICE" >&2
# Its socket too: a connection to the socket would start the service again mid-restore.
systemctl stop "$SMALLY_SERVICE.socket" "$SMALLY_SERVICE"
psql_admin -d postgres >/dev/null <<SQL
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$db' AND pid <> pg_backend_pid();
ALTER DATABASE "$db" RENAME TO "$previous";
ALTER DATABASE "$fresh" RENAME TO "$db";
SQL
forget_keys() { # forget_keys URL: unlink Smally's keys in the Redis at URL
    local redis_cli
    redis_cli_url "$1"
    redis_cli=(redis-cli ${redis_cli_user:+--user "$redis_cli_user"} -u "$redis_url")
    "${redis_cli[@]}" --scan --pattern "${redis_prefix}*" | xargs -r -n 500 "${redis_cli[@]}" unlink >/dev/null
}
forget_keys "$counters_url" ||
    echo "restore: could not clear Redis keys ${redis_prefix}* (counters rebuild when they expire)" >&2
# The cache is keyed by user id, and the restored database hands out ids again: an old entry
# would answer a new customer with another one's vector ("cached": true).
if [ -n "$cache_url" ] && ! forget_keys "$cache_url"; then
    die "could not clear the cache's Redis (CACHE_REDIS_URL): $SMALLY_SERVICE stays stopped, since its cached vectors belong to the users of the replaced database; clear it (redis-cli FLUSHALL there), then: systemctl start $SMALLY_SERVICE.socket $SMALLY_SERVICE. The previous database is $previous"
fi

echo "restore: starting $SMALLY_SERVICE" >&2
systemctl start "$SMALLY_SERVICE.socket" "$SMALLY_SERVICE"
for _ in $(seq 1 120); do
    if curl -fsS --max-time 5 "$health" 2>/dev/null | grep -q '"healthy"'; then
        echo "restore: done, $SMALLY_SERVICE is healthy. The previous database is kept as $previous:" >&2
        echo "  drop it once satisfied: sudo -u postgres dropdb $previous" >&2
        exit 0
    fi
    sleep 1
done
die "$SMALLY_SERVICE did not become healthy within 120 s (journalctl -u $SMALLY_SERVICE); the previous database is $previous"
