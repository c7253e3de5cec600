#!/usr/bin/env bash
# Restore a backup made by backup.sh. Run as root on the server:
#
#   sudo /home/smally/smally-api/scripts/restore.sh /home/smally/backups/smally-...sql.gz [--yes]
#
# 1. loads the backup into a fresh database (<name>_restore, owned by the app's role) while the
#    service still runs: a backup that does not load changes nothing;
# 2. asks for confirmation (unless --yes), stops the service, renames the current database to
#    <name>_pre_restore_<time> (kept: drop it yourself once satisfied) and the fresh one into its
#    place, forgets Smally's Redis keys (quota counters are rebuilt from the restored ledger,
#    cached vectors refill), starts the service and waits for /health.
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
redis_cli_url "$(env_value REDIS_URL)"
redis_prefix=$(env_value REDIS_KEY_PREFIX "smally:")
api_port=$(env_value API_PORT 8000)
as_postgres() { runuser -u postgres -- env PGOPTIONS="-c client_min_messages=warning" "$@"; }
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

read -r db role < <(psql -X -At -F ' ' "$database_url" -c 'SELECT current_database(), current_user') ||
    die "cannot connect with DATABASE_URL from $SMALLY_ENV_FILE"
fresh="${db}_restore"
previous="${db}_pre_restore_$(date -u +%Y%m%d%H%M%S)"

echo "restore: loading $backup into a fresh database $fresh" >&2
as_postgres dropdb --if-exists "$fresh"
as_postgres createdb --owner="$role" "$fresh"
# As the app's role, so that everything restored belongs to it; one transaction: all or nothing.
if ! { echo "SET ROLE \"$role\";"; gzip -dc "$backup"; } |
    psql_admin --single-transaction -d "$fresh" >/dev/null; then
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
if command -v redis-cli >/dev/null; then
    redis_cli=(redis-cli ${redis_cli_user:+--user "$redis_cli_user"} -u "$redis_url")
    "${redis_cli[@]}" --scan --pattern "${redis_prefix}*" |
        xargs -r -n 500 "${redis_cli[@]}" unlink >/dev/null ||
        echo "restore: could not clear Redis keys ${redis_prefix}* (counters rebuild when they expire)" >&2
fi

echo "restore: starting $SMALLY_SERVICE" >&2
systemctl start "$SMALLY_SERVICE.socket" "$SMALLY_SERVICE"
for _ in $(seq 1 120); do
    if curl -fsS --max-time 5 "http://127.0.0.1:$api_port/health" 2>/dev/null | grep -q '"healthy"'; then
        echo "restore: done, $SMALLY_SERVICE is healthy. The previous database is kept as $previous:" >&2
        echo "  drop it once satisfied: sudo -u postgres dropdb $previous" >&2
        exit 0
    fi
    sleep 1
done
die "$SMALLY_SERVICE did not become healthy within 120 s (journalctl -u $SMALLY_SERVICE); the previous database is $previous"
