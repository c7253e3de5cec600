#!/usr/bin/env bash
# One look at everything Smally needs on this host, by its roles (common.sh SMALLY_ROLES): api
# (the service, its /health where it listens, PostgreSQL and both Redis servers as it reaches
# them), edge (nginx, /health through it), data (PostgreSQL and both Redis servers running),
# backup (the timer, the newest backup's age); disk and memory everywhere. One line per check,
# exit status 0 only when every check passes (`make health` runs it on every host of the
# inventory over ssh). Run as root (it reads the .env).
#
#   sudo /home/smally/smally-api/scripts/health-check.sh [--wait SECONDS]
#
# --wait retries (quietly) until every check passes or SECONDS have passed, then reports once:
# `make restart` uses it to wait for the service to be back.
# SMALLY_DISK_MAX_PERCENT (default 90), SMALLY_MEMORY_MIN_PERCENT (default 10) and
# SMALLY_BACKUP_MAX_AGE_HOURS (default 26: a daily timer plus slack; 0 turns the check off) set the limits.
set -uo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [ "${1:-}" == --wait ]; then
    deadline=$((SECONDS + ${2:?--wait needs a number of seconds}))
    until "$0" >/dev/null 2>&1 || [ "$SECONDS" -ge "$deadline" ]; do
        sleep 2
    done
    exec "$0"
fi

disk_max=${SMALLY_DISK_MAX_PERCENT:-90}
memory_min=${SMALLY_MEMORY_MIN_PERCENT:-10}
backup_max_age=${SMALLY_BACKUP_MAX_AGE_HOURS:-26}
failed=0

report() { # report pass|fail NAME DETAIL
    local mark=PASS
    if [ "$1" != pass ]; then
        mark=FAIL
        failed=$((failed + 1))
    fi
    printf '%-5s %-14s %s\n' "$mark" "$2" "$3"
}
check() { # check NAME DETAIL COMMAND...: pass when COMMAND succeeds
    local name=$1 detail=$2
    shift 2
    if "$@" >/dev/null 2>&1; then report pass "$name" "$detail"; else report fail "$name" "$detail"; fi
}
# The status is all /health says through nginx; directly, from this machine, it says more.
health_status() { # the "status" of a /health answer, or "unreachable"
    local body
    body=$(curl -sS -k -L --max-time 10 "$1" 2>/dev/null) || { echo unreachable; return; }
    echo "$body" | sed -n 's/.*"status": *"\([a-z]*\)".*/\1/p' | head -n 1
}

has_role() { [[ " $SMALLY_ROLES " == *" $1 "* ]]; }
echo "health-check: $(hostname), roles: $SMALLY_ROLES"

if has_role api; then
    database_url=$(env_value DATABASE_URL)
    libpq_url "$database_url"
    counters_url=$(env_value REDIS_URL)
    cache_url=$(env_value CACHE_REDIS_URL)
    if [ -e "$SMALLY_HOST_DOWN_FILE" ]; then
        # Out of the cluster on purpose: its siblings serve; `make host-up` brings it back.
        report pass service "held down by make host-down since $(date -u -r "$SMALLY_HOST_DOWN_FILE" +%FT%TZ) (make host-up HOST=...)"
    else
        state=$(systemctl is-active "$SMALLY_SERVICE" 2>/dev/null)
        [ "$state" == active ] && report pass service "$SMALLY_SERVICE is $state" ||
            report fail service "$SMALLY_SERVICE is ${state:-unknown} (journalctl -u $SMALLY_SERVICE)"
        url=$(health_url)
        status=$(health_status "$url")
        [ "$status" == healthy ] && report pass health "$url is $status" ||
            report fail health "$url is ${status:-not JSON}"
    fi
    check postgresql "pg_isready with DATABASE_URL" pg_isready -q -d "$database_url"
    redis_ping() { # redis_ping NAME URL
        local pong
        redis_cli_url "$2"
        pong=$(redis-cli ${redis_cli_user:+--user "$redis_cli_user"} -u "$redis_url" ping 2>/dev/null | head -n 1)
        [ "$pong" == PONG ] && report pass "$1" "redis-cli ping: PONG" ||
            report fail "$1" "redis-cli ping: ${pong:-no answer}"
    }
    redis_ping redis "$counters_url"
    [ -z "$cache_url" ] || [ "$cache_url" == "$counters_url" ] || redis_ping redis-cache "$cache_url"
fi

if has_role edge; then
    check nginx "nginx is active" systemctl is-active --quiet nginx
    # Through nginx: port 80 redirects to 443 when TLS is on, hence -L -k (the name is not checked).
    status=$(health_status "http://127.0.0.1/health")
    [ "$status" == healthy ] && report pass nginx-health "/health through nginx is $status" ||
        report fail nginx-health "/health through nginx is ${status:-not JSON}"
fi

if has_role data; then
    check data-servers "postgresql, redis-server, redis-server@smally-cache are active" \
        systemctl is-active --quiet postgresql redis-server redis-server@smally-cache
    check data-postgres "pg_isready on 127.0.0.1" pg_isready -q -h 127.0.0.1
fi

if has_role backup; then
    check backups "smally-backup.timer is active" systemctl is-active --quiet smally-backup.timer
fi
if has_role backup && [ "$backup_max_age" -gt 0 ]; then
    # An active timer says nothing about whether its runs succeed: look at the newest file.
    newest=$(find "$SMALLY_BACKUP_DIR" -maxdepth 1 -name 'smally-*.sql.gz' -printf '%T@ %p\n' 2>/dev/null |
        sort -rn | head -n 1)
    now=${EPOCHSECONDS:-$(date +%s)}
    if [ -z "$newest" ]; then
        # A fresh install has had no nightly run yet: only a backup directory older than the
        # limit without a single backup in it is a failure.
        since=$(stat -c %Y "$SMALLY_BACKUP_DIR" 2>/dev/null || echo 0)
        dir_age=$(((now - since) / 3600))
        [ "$dir_age" -lt "$backup_max_age" ] &&
            report pass backup-age "no backup yet in $SMALLY_BACKUP_DIR (created ${dir_age} h ago)" ||
            report fail backup-age "no backup in $SMALLY_BACKUP_DIR"
    else
        age=$(((now - ${newest%%.*}) / 3600))
        [ "$age" -lt "$backup_max_age" ] && report pass backup-age "newest ${newest#* } is ${age} h old" ||
            report fail backup-age "newest ${newest#* } is ${age} h old (limit ${backup_max_age} h)"
    fi
fi

seen=" "
for path in / "$SMALLY_APP_DIR" "$SMALLY_BACKUP_DIR" /var/lib/postgresql /tmp; do
    [ -e "$path" ] || continue
    mount=$(df --output=target "$path" | tail -n 1)
    case "$seen" in *" $mount "*) continue ;; esac # one line per file system
    seen="$seen$mount "
    used=$(df --output=pcent "$path" | tail -n 1 | tr -dc 0-9)
    [ "$used" -lt "$disk_max" ] && report pass disk "$mount: ${used}% used" ||
        report fail disk "$mount: ${used}% used (limit ${disk_max}%)"
done

total=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
available=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
percent=$((available * 100 / total))
[ "$percent" -ge "$memory_min" ] &&
    report pass memory "$((available / 1024)) MiB available (${percent}%)" ||
    report fail memory "$((available / 1024)) MiB available (${percent}%, limit ${memory_min}%)"

if [ "$failed" -gt 0 ]; then
    echo "health-check: $failed check(s) failed"
    exit 1
fi
echo "health-check: all checks passed"
