#!/usr/bin/env bash
# Load a backup made by backup.sh into the EMPTY database of a new data host: the move of a
# single server's database to a cluster's data host (README "Growing past one server"). Run as
# root on the data host with common.sh's functions in front, the backup on stdin; the data host
# has no scripts/, so `make load-backup BACKUP=smally.sql.gz` sends both:
#
#   bash -c "$(cat common.sh load-backup.sh)" load-backup DATABASE ROLE < smally-<time>.sql.gz
#
# Refuses a database that already has tables (restore.sh replaces a live database on a single
# server; this only fills a new one). Loads in one transaction connected as ROLE, never as a
# superuser (common.sh's load_dump: the file is untrusted), with the password that make deploy
# left for root in /root/.smally.pgpass: all or nothing. Prints what it loaded.
set -euo pipefail

declare -F load_dump >/dev/null || { echo "load-backup: common.sh's functions are missing" >&2; exit 1; }
[ $# == 2 ] || die "usage: load-backup.sh DATABASE ROLE < BACKUP.sql.gz"
db=$1 role=$2
[ "$(id -u)" == 0 ] || die "run as root (it uses the postgres account)"
export PGPASSFILE=/root/.smally.pgpass
[ -r "$PGPASSFILE" ] || die "no $PGPASSFILE (make deploy writes it on the data host; deploy it first)"
psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -At -d "$db" "$@"; }

umask 077
backup=$(mktemp)
trap 'rm -f "$backup"' EXIT
cat >"$backup"
[ -s "$backup" ] || die "no backup on stdin"
gzip -t "$backup" || die "the backup on stdin is not a valid gzip file"

tables=$(psql_admin -c "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") ||
    die "cannot reach the database $db (was the data host deployed? make deploy DEPLOY_ARGS='--limit <data host>')"
[ "$tables" == 0 ] || die "$db already has $tables tables: it must be new and empty (nothing was changed)"

load_dump "postgresql://$role@localhost/$db" "$backup" || die "the backup did not load; nothing was changed"
psql_admin -F ' ' -c "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM api_keys),
    (SELECT coalesce(sum(embeddings_count), 0) FROM usage)" |
    { read -r users keys embeddings
      echo "load-backup: $db: $users users, $keys API keys, $embeddings embeddings in the usage ledger"; }
