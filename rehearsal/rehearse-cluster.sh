#!/usr/bin/env bash
# `make rehearse-cluster`: the cluster layout of ansible/inventory/cluster.example.yml, deployed
# with the real playbook to three throwaway machines (rehearsal/machines.sh: systemd-nspawn, each
# with its own address on a private network, reached over SSH), and proven through the edge.
# Needs root.
#
#   front 10.77.0.10   smally_data (PostgreSQL, both Redis) and smally_edge (nginx, TLS)
#   api1  10.77.0.11   smally_api
#   api2  10.77.0.12   smally_api
#
# Stages: tools, machines, build, deploy (twice: the second changed=0), network (what each host
# admits; the backup unit admits the data host; whether these machines enforce the units' IP
# filters), quota (300 concurrent requests of a free user with limit 100 through the edge: exactly
# 100 200s and 200 429s, served by both API hosts, the ledger 100), per-minute (300 concurrent
# requests of a pro user with a limit of 100 a minute: 100 200s and what the burst's duration
# adds, by both hosts, the ledger equal), rolling (a new build deployed
# host by host under steady load), host-down (`make host-down HOST=api1` under steady load: the
# edge drains it, then its socket and service stop; then `make host-up HOST=api1`: it starts,
# passes /health and serves again), operate (`make rollback` then `make restart` under steady
# load: each API host drained, restarted, back, both serving the same release; `make releases`
# and `make health` on every host), held (`make host-down HOST=api2`, then `make deploy` under
# steady load: api1, the only one serving, restarts in place, api2 stays down with the new
# release in place; `make host-down HOST=api1` is refused; `make rollback`: api1 in place, api2
# switched but still down; `make host-up HOST=api2` serves the rolled-back release), ledger
# (the usage rows equal the load's 200s), backup (`make backup`: the shared database dumped on
# the first API host). Prints the `cluster ...:` lines.
#
# Environment: SMALLY_CLUSTER_DIR (the run's files, default ~/.cache/smally/rehearsal-cluster),
# SMALLY_SKIP_BUILD=1 (deploy dist/ as it is first), SMALLY_REHEARSAL_KEEP=1 (leave the machines
# up after a failure).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${HOME:-/root}/.cache/smally
RUN=${SMALLY_CLUSTER_DIR:-$CACHE_ROOT/rehearsal-cluster}
STAGE="$RUN/stage"
ANSIBLE_VENV="$REPO/.cache/ansible-venv"
HOST_PY=python3
export ANSIBLE_CONFIG="$REPO/ansible/ansible.cfg"
EDGE=10.77.0.10
API1=10.77.0.11
API2=10.77.0.12
FREE_LIMIT=100
PRO_RPM=100

LOG_NAME=rehearse-cluster
# shellcheck source=stages.sh
. "$REPO/rehearsal/stages.sh"


on() { # on HOST COMMAND: run COMMAND (a shell string) on HOST as admin
    local host=$1
    shift
    timeout 300 ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR \
        -o UserKnownHostsFile="$RUN/known_hosts" -o StrictHostKeyChecking=yes \
        -i "$RUN/id_ed25519" "admin@$host" -- "$@"
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    [ -z "$LOAD_STOP" ] || touch "$LOAD_STOP"
    if [ "$status" != 0 ] && [ "${SMALLY_REHEARSAL_KEEP:-}" == 1 ]; then
        log "SMALLY_REHEARSAL_KEEP=1: the machines stay up ($RUN/machines); ssh -i $RUN/id_ed25519 admin@$API1"
        log "  then: rehearsal/machines.sh down $RUN/machines"
        print_times "FAILED (exit $status)"
        exit "$status"
    fi
    "$REPO/rehearsal/machines.sh" down "$RUN/machines"
    rm -f "$RUN/id_ed25519" "$RUN/vault_pass" "$RUN/tls/privkey.pem"
    if [ "$status" == 0 ]; then print_times PASSED; else print_times "FAILED (exit $status)"; fi
    exit "$status"
}

[ "$(id -u)" == 0 ] || die "needs root (systemd-nspawn, mounts, a bridge)"
mkdir -p "$RUN" "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/rehearsal-cluster.lock"
flock -n 9 || die "another cluster rehearsal is running (lock $CACHE_ROOT/rehearsal-cluster.lock)"
"$REPO/rehearsal/machines.sh" down "$RUN/machines" # what a killed run left behind
find "$RUN" -mindepth 1 -delete
trap cleanup EXIT
trap 'exit 130' INT TERM

begin tools "systemd-nspawn, nft, qemu-img; ansible"
install_tools systemd-nspawn:systemd-container nft:nftables qemu-img:qemu-utils debootstrap:debootstrap \
    mkfs.ext4:e2fsprogs ssh:openssh-client openssl:openssl curl:curl
make -C "$REPO" --no-print-directory ansible-tools
export PATH="$ANSIBLE_VENV/bin:$PATH"
end

begin machines "three machines on a private network (the VM image, under systemd-nspawn)"
ssh-keygen -q -t ed25519 -N '' -C "smally-cluster-$$" -f "$RUN/id_ed25519"
"$REPO/rehearsal/machines.sh" up "$RUN/machines" "$RUN/id_ed25519" front=$EDGE api1=$API1 api2=$API2
image=$("$REPO/rehearsal/vm-image.sh" | tail -n 1)
for address in $EDGE $API1 $API2; do
    echo "$address $(cut -d' ' -f1,2 "$image/ssh_host_ed25519_key.pub")"
done >"$RUN/known_hosts"
for address in $EDGE $API1 $API2; do
    on $address 'echo "$(hostname): $(. /etc/os-release; echo "$PRETTY_NAME"), systemd $(systemctl is-system-running)"' >&2
done
end

begin build "make build (release A)"
if [ "${SMALLY_SKIP_BUILD:-}" == 1 ]; then
    log "SMALLY_SKIP_BUILD=1: using dist/ as it is"
else
    make -C "$REPO" --no-print-directory build >"$RUN/build-a.log" 2>&1 || { tail -n 30 "$RUN/build-a.log" >&2; die "make build failed"; }
fi
release_a=$("$HOST_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["release"])' "$REPO/dist/BUILD.json")
end

begin single "one server first: every role on api1 (hosts.example.yml's layout), a key and its usage"
mkdir -p "$STAGE" "$RUN/tls" "$RUN/inventory"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- ansible nginx systemd scripts) |
    while IFS= read -r -d '' file; do
        [ -f "$REPO/$file" ] && install -D -m "$(stat -c %a "$REPO/$file")" "$REPO/$file" "$STAGE/$file"
    done
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=smally.test" -addext "subjectAltName=DNS:smally.test,IP:$EDGE,IP:$API1" \
    -keyout "$RUN/tls/privkey.pem" -out "$RUN/tls/fullchain.pem" 2>/dev/null
for address in $EDGE $API1; do
    on $address "sudo install -d -m 0755 /etc/ssl/smally && sudo tee /etc/ssl/smally/fullchain.pem >/dev/null" <"$RUN/tls/fullchain.pem"
    on $address "sudo install -m 0600 /dev/stdin /etc/ssl/smally/privkey.pem" <"$RUN/tls/privkey.pem"
done
openssl rand -hex 24 >"$RUN/vault_pass"
printf -- '---\nvault_smally_db_password: "%s"\nvault_smally_redis_password: "%s"\n' \
    "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" >"$STAGE/ansible/group_vars/all/vault.yml"
ansible-vault encrypt --vault-password-file "$RUN/vault_pass" "$STAGE/ansible/group_vars/all/vault.yml" >/dev/null
stage_dist() { # the build in dist/, copied: the playbook uploads $STAGE/dist
    mkdir -p "$STAGE/dist"
    cp -a "$REPO/dist/api" "$REPO/dist/create_api_key" "$REPO/dist/models" "$REPO/dist/BUILD.json" "$STAGE/dist/"
}
stage_dist
# ansible/inventory/hosts.example.yml on api1 and cluster.example.yml on the three machines (one
# address each: public and private are the same), with the rehearsal's own settings: its SSH
# key, its certificate, a free tier of $FREE_LIMIT, and nginx's per-address limits opened up
# (all the load comes from one address). The free tier's per-minute limits are off: the quota
# stage proves the monthly quota exact under 300 requests at once, which a limit of 60 requests
# a minute would refuse first.
SINGLE="$RUN/inventory/single.yml"
CLUSTER="$RUN/inventory/hosts.yml"
for example in hosts:"$SINGLE" cluster:"$CLUSTER"; do
    sed -e "s/203\.0\.113\.10/$EDGE/g; s/203\.0\.113\.11/$API1/g; s/203\.0\.113\.12/$API2/g" \
        -e "s/10\.0\.0\.10/$EDGE/g; s/10\.0\.0\.11/$API1/g; s/10\.0\.0\.12/$API2/g" \
        -e "s/api\.example\.com/smally.test/" -e '/^ *#/d' \
        "$REPO/ansible/inventory/${example%%:*}.example.yml" >"${example#*:}"
    cat >>"${example#*:}" <<VARS
        ansible_ssh_private_key_file: $RUN/id_ed25519
        ansible_ssh_common_args: >-
          -F /dev/null -o UserKnownHostsFile=$RUN/known_hosts -o StrictHostKeyChecking=yes
        smally_tls_certificate: /etc/ssl/smally/fullchain.pem
        smally_tls_certificate_key: /etc/ssl/smally/privkey.pem
        smally_rate_limit: 2000r/s
        smally_rate_burst: 2000
        smally_conn_limit: 2000
        smally_extra_env: {FREE_TIER_LIMIT: "$FREE_LIMIT", FREE_TIER_RPM: "-1", FREE_TIER_TPM: "-1", PRO_TIER_RPM: "$PRO_RPM"}
VARS
done
sed -i "s/ansible_host: $EDGE/ansible_host: $API1/" "$SINGLE" # the single server is api1
# The operator's make commands below run as written in docs/operations.md, against INVENTORY
# (the single server's, then the cluster's) with the rehearsal's playbook copy and vault.
export DEPLOY_PLAYBOOK="$STAGE/ansible/site.yml" VAULT_PASSWORD_FILE="$RUN/vault_pass"
export ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 ANSIBLE_SSH_CONTROL_PATH_DIR="$RUN/cp"
export INVENTORY="$SINGLE"
deploy() { # deploy LOG [ARG...]: make deploy; prints the recap lines, one per host
    local log=$1
    shift
    timeout 30m make -C "$REPO" --no-print-directory deploy DEPLOY_ARGS="$*" >"$log" 2>&1 ||
        { tail -n 60 "$log" >&2; die "the playbook failed (full log: $log)"; }
    grep -E '^(front|api1|api2) +: ok=' "$log"
}
check_at() { # check_at ADDRESS CHECK [ARG...]: rehearsal/check_http.py against nginx at ADDRESS
    local address=$1
    shift
    "$HOST_PY" "$REPO/rehearsal/check_http.py" "$@" --https "https://$address" --http "http://$address" \
        --ca "$RUN/tls/fullchain.pem"
}
check() { check_at $EDGE "$@"; } # through the cluster's edge
create_key() { # create_key EMAIL TIER: make create-key (on the first API host); prints the key
    local key
    key=$(timeout 180 make -C "$REPO" --no-print-directory create-key EMAIL="$1" TIER="$2" 2>"$RUN/create-key.err") ||
        { cat "$RUN/create-key.err" >&2; die "make create-key $1 failed"; }
    [[ "$key" =~ ^sk_[0-9a-f]{64}$ ]] || die "make create-key printed '$key', not a key alone"
    echo "$key"
}
ledger() { # ledger EMAIL [HOST]: the embeddings the usage table holds for EMAIL (on the data host)
    on "${2:-$EDGE}" "sudo -u postgres psql -d smally -Atc \"SELECT coalesce(sum(u.embeddings_count), 0) FROM usage u
        JOIN users s ON s.id = u.user_id WHERE s.email = '$1'\""
}
wait_ledger() { # wait_ledger EMAIL N [HOST]: the ledger is written every second; wait for N
    local value
    for _ in $(seq 30); do
        value=$(ledger "$1" "${3:-$EDGE}")
        [ "$value" == "$2" ] && break
        sleep 1
    done
    echo "$value"
}
served() { # served ADDRESS: the /v1/embed answers the API host at ADDRESS has given
    on "$1" "curl -sS http://$1:8000/metrics" |
        awk '/^smally_requests_total\{.*endpoint="\/v1\/embed"/ { n += $2 } END { printf "%d\n", n }'
}
recaps=$(deploy "$RUN/deploy-single.log")
log "one server:"$'\n'"$recaps"
grep -q 'failed=0' <<<"$recaps" || die "the single server's deploy: $recaps"
OLD_KEY=$(create_key old@rehearsal.test pro)
for _ in 1 2 3; do check_at $API1 key-ok --key "$OLD_KEY"; done
old_ledger=$(wait_ledger old@rehearsal.test 3 $API1)
[ "$old_ledger" == 3 ] || die "the single server's ledger holds $old_ledger embeddings, not 3"
log "api1 serves alone: a pro key, 3 embeddings in its ledger"
end

begin grow "to the cluster: api1 stopped, make backup, download-backup; the data host deployed, make load-backup; make deploy (twice: the second changed=0)"
stopped=$(date +%s)
on $API1 'sudo systemctl stop smally.socket smally' # writes stop; its ledger is flushed
backup=$(timeout 300 make -C "$REPO" --no-print-directory backup 2>"$RUN/backup.err" | tail -n 1) ||
    { cat "$RUN/backup.err" >&2; die "make backup (the single server) failed"; }
(cd "$RUN" && timeout 300 make -C "$REPO" --no-print-directory download-backup BACKUP="$backup" > smally.sql.gz ) ||
    die "make download-backup failed"
gzip -t "$RUN/smally.sql.gz" || die "the downloaded backup is not a valid gzip file"
export INVENTORY="$CLUSTER"
recaps=$(deploy "$RUN/deploy-data.log" --limit front)
log "the data host alone:"$'\n'"$recaps"
timeout 300 make -C "$REPO" --no-print-directory load-backup BACKUP="$RUN/smally.sql.gz" >&2 ||
    die "make load-backup failed"
recaps=$(deploy "$RUN/deploy-1.log")
log "the cluster, first run:"$'\n'"$recaps"
[ "$(grep -c 'failed=0' <<<"$recaps")" == 3 ] || die "first run: $recaps"
check health
log "out of service for $(($(date +%s) - stopped)) s (api1 stopped until the cluster answered through the edge)"
check key-ok --key "$OLD_KEY"
moved_ledger=$(wait_ledger old@rehearsal.test 4)
log "moved: the single server's key works through the edge; the ledger holds $moved_ledger embeddings (3 before, 1 after)"
[ "$moved_ledger" == 4 ] || die "the moved ledger holds $moved_ledger embeddings, not 4"
recaps=$(deploy "$RUN/deploy-2.log")
log "the cluster, second run:"$'\n'"$recaps"
if [ "$(grep -c ' changed=0 .*failed=0' <<<"$recaps")" != 3 ]; then
    grep -E '^changed:' "$RUN/deploy-2.log" >&2 || true
    die "the second run is not idempotent"
fi
end

begin network "what each host admits: PostgreSQL and Redis only to the API hosts, :8000 only to the edge"
check health
reaches() { timeout 3 bash -c "echo >/dev/tcp/$1/$2" 2>/dev/null; } # from this host, the outsider
for port in 5432 6379 6380; do
    on $API1 "timeout 5 bash -c 'echo >/dev/tcp/$EDGE/$port'" || die "api1 cannot reach the data host's port $port"
    if reaches $EDGE $port; then die "the data host's port $port admits an outsider"; fi
done
on $EDGE "timeout 5 bash -c 'echo >/dev/tcp/$API1/8000'" || die "the edge cannot reach api1's :8000"
if reaches $API1 8000; then die "api1's :8000 admits an outsider"; fi
if on $API2 "timeout 5 bash -c 'echo >/dev/tcp/$API1/8000'" 2>/dev/null; then die "api2 reaches api1's :8000: only the edge may"; fi
reaches $API1 22 || die "api1's SSH is closed"
on $API1 "redis-cli -h $EDGE ping" | grep -q NOAUTH || die "the data host's Redis answers without the password"
on $API1 'sudo grep -h IPAddressAllow /etc/systemd/system/smally.service.d/cluster.conf' >"$RUN/ipallow.txt"
grep -qx "IPAddressAllow=$EDGE $API1" "$RUN/ipallow.txt" || die "api1's unit admits: $(cat "$RUN/ipallow.txt")"
backup_allow=$(on $API1 'systemctl show smally-backup -p IPAddressAllow --value')
[[ " $backup_allow " == *" $EDGE/32 "* ]] || die "api1's backup unit does not admit the data host: $backup_allow"
# Whether this kernel enforces the units' IP filters (cgroup v2 with BPF): a unit admitting
# localhost alone, as smally-backup.service without its drop-in, reaching the data host.
if on $API1 "sudo systemd-run --quiet --wait --pipe -p IPAddressDeny=any -p IPAddressAllow=localhost \
    timeout 5 bash -c 'echo >/dev/tcp/$EDGE/5432'" 2>/dev/null; then
    filters="not enforced on these machines (the VM rehearsal proves them)"
else
    filters=enforced
fi
on $EDGE "sudo grep -E '^host[[:space:]]+smally' \$(sudo -u postgres psql -Atc 'SHOW hba_file')" >"$RUN/hba.txt"
sed 's/^/    /' "$RUN/hba.txt" >&2
[ "$(grep -c "scram-sha-256" "$RUN/hba.txt")" == 2 ] && grep -q "$API1/32" "$RUN/hba.txt" && grep -q "$API2/32" "$RUN/hba.txt" ||
    die "pg_hba.conf does not admit exactly the two API hosts"
# api1, the former single server, kept nothing of its other roles: no server, no firewall rule.
active=$(on $API1 'systemctl is-active postgresql redis-server redis-server@smally-cache nginx' | grep -cx active || true)
[ "$active" == 0 ] || die "api1 still runs $active of PostgreSQL, Redis, the cache's Redis, nginx"
if on $API1 'sudo ufw status' | grep -q '80,443'; then die "api1's firewall still admits HTTP and HTTPS"; fi
# Prometheus on the edge scrapes each API host's /metrics on its private address (README).
for address in $API1 $API2; do
    on $EDGE "curl -sSf http://$address:8000/metrics" | grep -q '^smally_requests_total' ||
        die "the edge cannot scrape $address:8000/metrics"
done
log "PostgreSQL and Redis (5432, 6379, 6380) admit the API hosts only, :8000 the edge only (it scrapes both API hosts' /metrics); api1's unit: $(cat "$RUN/ipallow.txt"), its backup: $backup_allow; IP filters $filters; api1 runs none of its former roles' servers"
end

begin quota "300 concurrent requests of a free user (limit $FREE_LIMIT) through the edge"
QUOTA_KEY=$(create_key quota@rehearsal.test free)
before1=$(served $API1)
before2=$(served $API2)
check quota --key "$QUOTA_KEY" --count 300 --parallel 300 >"$RUN/quota.out" 2>&1 || { cat "$RUN/quota.out" >&2; die "quota check"; }
read -r ok200 ok429 < <(sed -n 's/^ok *200s=\([0-9]*\) 429s=\([0-9]*\) other=0$/\1 \2/p' "$RUN/quota.out")
hosts_serving=0
[ "$(served $API1)" -gt "$before1" ] && hosts_serving=$((hosts_serving + 1))
[ "$(served $API2)" -gt "$before2" ] && hosts_serving=$((hosts_serving + 1))
quota_ledger=$(wait_ledger quota@rehearsal.test "$FREE_LIMIT")
log "cluster quota: 200s=$ok200 429s=$ok429 hosts_serving=$hosts_serving ledger=$quota_ledger"
[ "$ok200" == "$FREE_LIMIT" ] && [ "$ok429" == $((300 - FREE_LIMIT)) ] && [ "$hosts_serving" == 2 ] &&
    [ "$quota_ledger" == "$FREE_LIMIT" ] || die "the quota is not exact across the API hosts"
end

begin per-minute "300 concurrent requests of a pro user (limit $PRO_RPM a minute) through the edge"
# A GCRA: $PRO_RPM at once, then one every 60 / $PRO_RPM s while the burst lasts. Exact across the
# API hosts: the 200s are at least the limit and at most what the burst's duration adds to it.
RATE_KEY=$(create_key rate@rehearsal.test pro)
before1=$(served $API1)
before2=$(served $API2)
started=$(date +%s%N)
check quota --key "$RATE_KEY" --count 300 --parallel 300 >"$RUN/rate.out" 2>&1 || { cat "$RUN/rate.out" >&2; die "per-minute check"; }
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
read -r rate200 rate429 < <(sed -n 's/^ok *200s=\([0-9]*\) 429s=\([0-9]*\) other=0$/\1 \2/p' "$RUN/rate.out")
most=$((PRO_RPM + elapsed_ms * PRO_RPM / 60000 + 1))
hosts_serving=0
[ "$(served $API1)" -gt "$before1" ] && hosts_serving=$((hosts_serving + 1))
[ "$(served $API2)" -gt "$before2" ] && hosts_serving=$((hosts_serving + 1))
rate_ledger=$(wait_ledger rate@rehearsal.test "$rate200")
log "cluster per-minute limit: 200s=$rate200 (allowed $PRO_RPM..$most in ${elapsed_ms} ms) 429s=$rate429 hosts_serving=$hosts_serving ledger=$rate_ledger"
[ "$rate200" -ge "$PRO_RPM" ] && [ "$rate200" -le "$most" ] && [ $((rate200 + rate429)) == 300 ] &&
    [ "$hosts_serving" == 2 ] && [ "$rate_ledger" == "$rate200" ] ||
    die "the per-minute limit is not exact across the API hosts"
end

# The load (stages.sh under_load) as its own user, 20 requests/s: its 200s must be in the ledger.
LOAD_KEY=$(create_key load@rehearsal.test scale)
LOAD_RATE=20
# The releases that serve meanwhile, as each API host's own /health names them (through the
# edge /health names none): one ssh session per host, printing it every second.
for address in $API1 $API2; do
    LOAD_RELEASE_ARGS+=(--release-command "$(printf '%q ' ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=10 \
        -o LogLevel=ERROR -o UserKnownHostsFile="$RUN/known_hosts" -o StrictHostKeyChecking=yes -i "$RUN/id_ed25519" \
        "admin@$address" -- "while sleep 1; do curl -sS --max-time 5 http://$address:8000/health; echo; done")")
done

begin rolling "a new build (release B) deployed host by host under steady load"
make -C "$REPO" --no-print-directory build >"$RUN/build-b.log" 2>&1 || { tail -n 30 "$RUN/build-b.log" >&2; die "make build (B) failed"; }
release_b=$("$HOST_PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["release"])' "$REPO/dist/BUILD.json")
[ "$release_b" != "$release_a" ] || die "the rebuild has the release name of the first build"
stage_dist
under_load rolling deploy "$RUN/deploy-3.log"
if grep -E '^(front|api1|api2) +: ok=' "$RUN/deploy-3.log" | grep -vq 'failed=0'; then die "the rolling deploy failed"; fi
for address in $API1 $API2; do
    on $address "curl -sS http://$address:8000/health" | grep -q "\"release\":\"$release_b\"" ||
        die "$address does not serve $release_b after the rolling deploy"
done
drained=$(grep -A4 -E 'TASK \[Edge \| Render the site, the API hosts out: api[12]' "$RUN/deploy-3.log" | grep -Ec '^changed: \[api[12] ')
[ "$drained" == 2 ] || die "the rolling deploy drained $drained API hosts from the edge, not 2"
log "cluster rolling deploy: $LOAD"
log "both API hosts serve $release_b (was $release_a), each drained from the edge while it restarted"
end

begin host-down "api1 taken out (make host-down: drained at the edge, then stopped) and back (make host-up), under steady load"
HOST_LOG="$RUN/host.log"
host_down() {
    timeout 600 make -C "$REPO" --no-print-directory host-down HOST=api1 >>"$HOST_LOG" 2>&1 ||
        { tail -n 40 "$HOST_LOG" >&2; echo "make host-down failed"; return 1; }
    if on $EDGE "timeout 3 bash -c 'echo >/dev/tcp/$API1/8000'" 2>/dev/null; then
        echo "api1's :8000 still accepts connections after make host-down"
        return 1
    fi
    local out2
    out2=$(served $API2)
    sleep 8
    [ "$(served $API2)" -gt "$out2" ] || { echo "api2 served nothing while api1 was out"; return 1; }
    timeout 600 make -C "$REPO" --no-print-directory host-up HOST=api1 >>"$HOST_LOG" 2>&1 ||
        { tail -n 40 "$HOST_LOG" >&2; echo "make host-up failed"; return 1; }
    local back
    back=$(served $API1)
    sleep 3
    [ "$(served $API1)" -gt "$back" ] || { echo "api1 did not rejoin after make host-up"; return 1; }
}
under_load host-down host_down
log "cluster host down: $LOAD"
grep -E '^(changed|ok): \[api1' "$HOST_LOG" | grep -E 'front|smally\.socket|=> \(item=smally\)' | sed 's/^/    /' >&2 || true
end

begin operate "make rollback, then make restart, under steady load: every API host in turn; make releases, make health"
OPERATE_LOG="$RUN/operate.log"
rollback_and_restart() {
    local operation
    for operation in rollback restart; do
        timeout 900 make -C "$REPO" --no-print-directory $operation >>"$OPERATE_LOG" 2>&1 ||
            { tail -n 40 "$OPERATE_LOG"; echo "make $operation failed"; return 1; }
    done
}
under_load operate rollback_and_restart
for address in $API1 $API2; do
    on $address "curl -sS http://$address:8000/health" | grep -q "\"release\":\"$release_a\"" ||
        die "$address does not serve $release_a after make rollback and make restart"
done
[ "$(grep -c "\"msg\": \"api[12]: rollback: serving $release_a\"" "$OPERATE_LOG")" == 2 ] &&
    [ "$(grep -c "\"msg\": \"api[12]: restart: serving $release_a\"" "$OPERATE_LOG")" == 2 ] ||
    die "make rollback and make restart did not each report both API hosts serving $release_a"
drained=$(grep -A4 -E 'TASK \[Edge \| Render the site, the API hosts out: api[12]' "$OPERATE_LOG" | grep -Ec '^changed: \[api[12] ')
[ "$drained" == 4 ] || die "make rollback and make restart drained $drained API hosts from the edge, not 4"
log "cluster rollback and restart: $LOAD"
log "both API hosts serve $release_a again (was $release_b), each drained from the edge while it restarted, twice"
timeout 300 make -C "$REPO" --no-print-directory releases >"$RUN/releases.out" 2>&1 || { cat "$RUN/releases.out" >&2; die "make releases failed"; }
sed 's/^/    /' "$RUN/releases.out" >&2
[ "$(grep -cx "\* $release_a (serving)" "$RUN/releases.out")" == 2 ] && [ "$(grep -cx "  $release_b" "$RUN/releases.out")" == 2 ] &&
    grep -qx '== api1 ==' "$RUN/releases.out" && grep -qx '== api2 ==' "$RUN/releases.out" ||
    die "make releases does not list both API hosts serving $release_a"
timeout 300 make -C "$REPO" --no-print-directory health >"$RUN/health.out" 2>&1 || { cat "$RUN/health.out" >&2; die "make health failed"; }
sed 's/^/    /' "$RUN/health.out" >&2
[ "$(grep -c '^health-check: all checks passed$' "$RUN/health.out")" == 3 ] || die "make health did not pass on the three hosts"
log "make releases: both API hosts; make health: front (edge data), api1 (api backup), api2 (api) passed"
end

begin held "make host-down HOST=api2, make deploy under steady load (api1 alone: in place), host-down api1 refused, make rollback, host-up api2"
held_deploy() {
    timeout 600 make -C "$REPO" --no-print-directory host-down HOST=api2 >>"$HOST_LOG" 2>&1 ||
        { tail -n 40 "$HOST_LOG"; echo "make host-down HOST=api2 failed"; return 1; }
    timeout 30m make -C "$REPO" --no-print-directory deploy >"$RUN/deploy-4.log" 2>&1 ||
        { tail -n 60 "$RUN/deploy-4.log"; echo "make deploy with api2 held down failed"; return 1; }
}
under_load held held_deploy
log "cluster deploy with api2 held down: $LOAD"
grep -q 'No other API host serves (api2 held down): the edge keeps api1' "$RUN/deploy-4.log" ||
    die "the deploy did not restart api1 in place"
on $API1 "curl -sS http://$API1:8000/health" | grep -q "\"release\":\"$release_b\"" || die "api1 does not serve $release_b after the deploy"
api2_state=$(on $API2 'systemctl is-active smally.socket smally' | tr '\n' ' ' || true)
[ "$api2_state" == "inactive inactive " ] || die "api2 after the deploy: $api2_state, not held down"
[ "$(on $API2 'sudo readlink /home/smally/smally-api/current')" == "releases/$release_b" ] ||
    die "the deploy did not put $release_b in place on the held-down api2"
on $EDGE 'grep -E "^ *server " /etc/nginx/sites-available/smally' | grep -q "$API2:8000 .* down;" ||
    die "the edge no longer keeps api2 down after the deploy"
if timeout 600 make -C "$REPO" --no-print-directory host-down HOST=api1 >"$RUN/host-down-last.log" 2>&1; then
    die "make host-down HOST=api1 took out the last serving host"
fi
grep -q 'Refusing to take api1 out: no other API host serves' "$RUN/host-down-last.log" ||
    { tail -n 20 "$RUN/host-down-last.log" >&2; die "make host-down HOST=api1 failed without saying why"; }
check health
timeout 300 make -C "$REPO" --no-print-directory health >"$RUN/health-held.out" 2>&1 || { cat "$RUN/health-held.out" >&2; die "make health failed with api2 held down"; }
grep -Eq '^PASS +service +held down by make host-down' "$RUN/health-held.out" || die "make health does not say api2 is held down"
# A rollback meanwhile: api1 rolls back in place; api2 gets the release but stays down.
timeout 600 make -C "$REPO" --no-print-directory rollback >"$RUN/rollback-held.log" 2>&1 ||
    { tail -n 40 "$RUN/rollback-held.log" >&2; die "make rollback with api2 held down failed"; }
grep -q "api1: rollback: serving $release_a\"" "$RUN/rollback-held.log" ||
    { tail -n 40 "$RUN/rollback-held.log" >&2; die "make rollback did not bring api1 to $release_a"; }
[ "$(on $API2 'sudo readlink /home/smally/smally-api/current')" == "releases/$release_a" ] ||
    die "make rollback did not switch the held-down api2 to $release_a"
api2_state=$(on $API2 'systemctl is-active smally.socket smally' | tr '\n' ' ' || true)
[ "$api2_state" == "inactive inactive " ] || die "api2 after the rollback: $api2_state, not held down"
timeout 600 make -C "$REPO" --no-print-directory host-up HOST=api2 >>"$HOST_LOG" 2>&1 ||
    { tail -n 40 "$HOST_LOG" >&2; die "make host-up HOST=api2 failed"; }
on $API2 "curl -sS http://$API2:8000/health" | grep -q "\"release\":\"$release_a\"" || die "api2 does not serve $release_a after make host-up"
log "api2 held down through the deploy (stopped, $release_b in place, down at the edge); make host-down HOST=api1: refused; make rollback: api1 in place, api2 switched to $release_a and still down; make host-up HOST=api2: serves $release_a"
end

begin ledger "the usage ledger equals the 200s the edge answered"
load_ledger=$(wait_ledger load@rehearsal.test "$LOAD_200S")
log "usage ledger: $load_ledger embeddings for the load's $LOAD_200S 200s; $quota_ledger for the quota's $ok200"
[ "$load_ledger" == "$LOAD_200S" ] || die "the ledger holds $load_ledger, the load got $LOAD_200S 200s"
end

begin backup "make backup: the shared database, dumped on the first API host"
backup=$(timeout 300 make -C "$REPO" --no-print-directory backup 2>"$RUN/backup.err" | tail -n 1) || { cat "$RUN/backup.err" >&2; die "make backup failed"; }
[[ "$backup" == /home/smally/backups/smally-*.sql.gz ]] || die "make backup printed '$backup'"
on $API1 "sudo zcat '$backup'" | grep -q 'load@rehearsal.test' || die "$backup does not hold the load's user"
log "make backup (smally-backup.service on api1, pg_dump from the data host): $backup"
end
