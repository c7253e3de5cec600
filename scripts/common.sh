# Sourced by the other scripts in this directory; not run on its own.
# The server layout (ansible/site.yml puts it there):
#   /home/smally/smally-api/{.env,scripts/,releases/<release>/{api,create_api_key,models/,BUILD.json},
#   current -> releases/<release>}   /home/smally/backups/

SMALLY_APP_DIR=${SMALLY_APP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
SMALLY_ENV_FILE=${SMALLY_ENV_FILE:-$SMALLY_APP_DIR/.env}
SMALLY_BACKUP_DIR=${SMALLY_BACKUP_DIR:-/home/smally/backups}
SMALLY_SERVICE=${SMALLY_SERVICE:-smally}
SMALLY_USER=${SMALLY_USER:-smally}
# This host's roles (api, edge, data, backup: ansible/site.yml writes them on every host); a
# server without the file is a single server, which has them all.
SMALLY_ROLES=${SMALLY_ROLES:-$(cat "$SMALLY_APP_DIR/roles" 2>/dev/null || echo api edge data backup)}
# Present while `make host-down` holds this API host out of the cluster (ansible/host.yml).
SMALLY_HOST_DOWN_FILE=${SMALLY_HOST_DOWN_FILE:-$SMALLY_APP_DIR/host-down}

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

# exec_release BINARY [ARGS...]: run the serving release's BINARY (api, create_api_key) as
# $SMALLY_USER from the app directory, where it reads the .env.
exec_release() {
    local binary=$1
    shift
    [ -x "$SMALLY_APP_DIR/current/$binary" ] || die "no $SMALLY_APP_DIR/current/$binary (deploy first)"
    cd "$SMALLY_APP_DIR"
    if [ "$(id -un)" == "$SMALLY_USER" ]; then
        exec "./current/$binary" "$@"
    fi
    [ "$(id -u)" == 0 ] || die "run as root or $SMALLY_USER (the .env is readable by $SMALLY_USER only)"
    exec runuser -u "$SMALLY_USER" -- "./current/$binary" "$@"
}

# env_value NAME [DEFAULT]: NAME from the environment, else from the .env (systemd EnvironmentFile
# syntax: KEY=VALUE, optional `export `, optional surrounding quotes), else DEFAULT.
env_value() {
    local name=$1 default=${2-} line value
    if [ -n "${!name-}" ]; then
        printf '%s\n' "${!name}"
        return 0
    fi
    [ -r "$SMALLY_ENV_FILE" ] || die "cannot read $SMALLY_ENV_FILE (run as root or $SMALLY_USER)"
    line=$(grep -E "^[[:space:]]*(export[[:space:]]+)?$name[[:space:]]*=" "$SMALLY_ENV_FILE" | tail -n 1 || true)
    if [ -z "$line" ]; then
        printf '%s\n' "$default"
        return 0
    fi
    value=${line#*=}
    value=$(printf '%s' "$value" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')
    case "$value" in
    \"*\" | \'*\') value=${value:1:${#value}-2} ;;
    esac
    printf '%s\n' "$value"
}

# health_url: the service's /health where it listens (the .env's API_HOST and API_PORT: on a
# cluster's API host its private address, not 127.0.0.1). It names the release and the checks to
# a caller on its own machine only, never through nginx. SMALLY_HEALTH_URL overrides it.
health_url() {
    local host port
    if [ -n "${SMALLY_HEALTH_URL:-}" ]; then
        printf '%s\n' "$SMALLY_HEALTH_URL"
        return 0
    fi
    host=$(env_value API_HOST 127.0.0.1)
    port=$(env_value API_PORT 8000)
    case "$host" in
    0.0.0.0 | "") host=127.0.0.1 ;; # every address: this machine's own is one of them
    :: | "[::]") host="[::1]" ;;
    *:*) host="[${host#[}" && host="${host%]}]" ;; # an IPv6 literal, bracketed once
    esac
    printf 'http://%s:%s/health\n' "$host" "$port"
}

# libpq_url URL: set database_url to URL without its password and export that password as PGPASSWORD, so the
# password never reaches a pg_dump/psql/pg_isready command line (/proc/PID/cmdline is readable by
# every local user; a process's environment only by its owner and root).
libpq_url() {
    local url=$1 scheme rest userinfo hostpart password
    case "$url" in
    *://*@*) ;;
    *)
        database_url=$url
        return 0
        ;;
    esac
    scheme=${url%%://*}
    rest=${url#*://}
    userinfo=${rest%%@*}
    hostpart=${rest#*@}
    case "$userinfo" in
    *:*)
        password=${userinfo#*:}
        # Percent-decode (URL syntax) for libpq's plain PGPASSWORD.
        PGPASSWORD=$(printf '%b' "${password//%/\\x}")
        export PGPASSWORD
        userinfo=${userinfo%%:*}
        ;;
    esac
    database_url="$scheme://$userinfo@$hostpart"
}

# as_postgres COMMAND...: COMMAND as the postgres OS user (peer authentication as the superuser),
# for what needs it: creating, dropping and renaming databases; never to read a backup.
as_postgres() { runuser -u postgres -- env PGOPTIONS="-c client_min_messages=warning" "$@"; }

# load_dump URL BACKUP: load BACKUP (backup.sh's gzip'd plain SQL) into the database that URL
# names, connected as URL's role, in one transaction: all or nothing. The file is untrusted
# input, so the role must not be a superuser (a dump's RESET ROLE, COPY ... TO PROGRAM or ALTER
# ROLE would run as one), and psql's meta-commands (\! runs a shell, \o |cmd) are refused from
# the first line on by \restrict with a key the file cannot know. pg_dump writes a \restrict
# and \unrestrict of its own around the dump: those lines are dropped (a COPY row cannot look
# like them: every table of the schema has more than one column). Needs a psql that knows
# \restrict (14.19, 15.14, 16.10, 17.6 or later); an older one refuses the whole load.
load_dump() {
    local url=$1 backup=$2 superuser key
    superuser=$(psql -X -At -d "$url" -c 'SELECT rolsuper FROM pg_roles WHERE rolname = current_user') ||
        return 1
    if [ "$superuser" != f ]; then
        echo "$(basename "$0"): the role of DATABASE_URL is a superuser: a backup is never loaded as one" >&2
        return 1
    fi
    key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    { printf '\\restrict %s\n' "$key"; gzip -dc "$backup" | sed -E '/^\\(un)?restrict [A-Za-z0-9]+$/d'; } |
        PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 --single-transaction -d "$url" >/dev/null
}

# redis_cli_url URL: set redis_url to URL without its credentials, redis_cli_user to its user name
# (ACL; empty for the default user), and export its password as REDISCLI_AUTH, which redis-cli reads
# from there: like libpq_url, it keeps the password off command lines. Use:
#   redis-cli ${redis_cli_user:+--user "$redis_cli_user"} -u "$redis_url" ping
redis_cli_url() {
    local url=$1 scheme rest userinfo password
    unset REDISCLI_AUTH
    redis_cli_user=""
    redis_url=$url
    case "$url" in
    *://*@*) ;;
    *) return 0 ;;
    esac
    scheme=${url%%://*}
    rest=${url#*://}
    userinfo=${rest%%@*}
    case "$userinfo" in
    *:*)
        redis_cli_user=${userinfo%%:*}
        password=${userinfo#*:}
        REDISCLI_AUTH=$(printf '%b' "${password//%/\\x}")
        export REDISCLI_AUTH
        ;;
    *) redis_cli_user=$userinfo ;; # redis-py reads redis://name@host as a user without password
    esac
    redis_url="$scheme://${rest#*@}"
}
