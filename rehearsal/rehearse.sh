#!/usr/bin/env bash
# `make rehearse`: deploy Smally with the real playbook to a throwaway Debian 12 x86_64 server and
# prove that it works, instead of finding out in production. Needs root; installs what it lacks
# (qemu-system-x86, qemu-utils, debootstrap, systemd-container, nftables) with apt-get.
#
# Two servers from one base image (rehearsal/vm-image.sh), one after the other:
#   the machine  a systemd-nspawn machine (rehearsal/machines.sh: systemd as PID 1, its own
#                address on a private bridge): every stage that runs the playbook again and again,
#                where a playbook run takes a fifth of the VM's time;
#   the VM       qemu (TCG) with its own kernel: what the machine, sharing this host's kernel,
#                cannot show — the unit's IP filters enforced (cgroup v2 BPF; this host's
#                hierarchy does not apply them to nspawn machines), the unit's whole sandbox
#                applied by a kernel of the distribution's own, systemd-analyze's exposure there.
#
# Stages (each one timed; the table is printed at the end, also after a failure):
#   tools      qemu, debootstrap, nspawn, nft (apt-get, when missing); ansible + ansible-lint
#   lint       ansible-lint --profile production, bash -n on the scripts
#   image      the cached base image (rehearsal/vm-image.sh; ~/.cache/smally/vm)
#   machine    the machine booted (its overlay of the image)
#   build      make build (x86_64)
#   deploy     make deploy to the machine: test inventory and vault; must end failed=0
#   checks     from the host, through nginx: health (the status alone, no build), create-key
#              over ssh, the reference vectors, security headers, limit_req (its 429s JSON with
#              Retry-After; an IPv6 /64 as one client), 413s (the service's a little over
#              MAX_REQUEST_BYTES, nginx's JSON far over), nginx's JSON 502 with the service
#              stopped, /metrics refused; port 80, ACME; make health
#   redeploy   the playbook again: changed=0
#   restart    make restart under steady load through nginx (check_http.py load): no request
#              fails; keys and data survive, health comes back; make logs shows them
#   rotate     the database password rotated as docs/operations.md says (ansible-vault edit, make
#              deploy): the old one refused, the service healthy
#   build-b    a second build of the tree (release B: same commit, a later build time)
#   releases   under steady load each: make deploy of B, then make rollback to A; no request
#              fails, the server's own /health names the release; make releases lists both,
#              marks the serving one; the ledger equals the load's 200s
#   operate    docs/operations.md's commands: make api (keys list/revoke, usage, migrate --status,
#              --rollback), make usage-export (its rows add up to the ledger), the
#              troubleshooting commands on the healthy server, certbot renew
#   restore    make backup, a new key; restore.sh refuses a hostile backup (nothing run, the
#              role unchanged); restore.sh --yes: the new key is gone, the old one works, the
#              cache's Redis is empty
#   launch     the machine powered off; qemu on a fresh qcow2 overlay of the image
#   boot       waiting for the VM's SSH
#   vm-deploy  make deploy to the VM: failed=0; health, a key and the reference vectors through
#              its nginx
#   security   on the VM: systemd-analyze security smally.service <= 2.5, and the running service
#              is exactly systemd/smally.service (no drop-ins, seccomp and no-new-privileges on),
#              running the deployed release's api, on smally.socket; the kernel enforces the
#              units' IP filters (a localhost-only sandbox cannot reach the VM's own address)
#   poweroff   the VM powers off, its overlay is deleted (also on failure, from the EXIT trap)
#
# Environment: SMALLY_VM_CACHE (base images, default ~/.cache/smally/vm), SMALLY_REHEARSAL_DIR
# (the run's files and logs, default ~/.cache/smally/rehearsal), SMALLY_VM_MEMORY (MiB, 4096),
# SMALLY_VM_CPUS (2), SMALLY_VM_ACCEL (tcg; kvm where /dev/kvm works), SMALLY_SKIP_BUILD=1
# (use dist/ as it is), SMALLY_REHEARSAL_KEEP=1 (after a failure, leave the machine or the VM
# running to look).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${HOME:-/root}/.cache/smally
RUN=${SMALLY_REHEARSAL_DIR:-$CACHE_ROOT/rehearsal}
VM_MEMORY=${SMALLY_VM_MEMORY:-4096}
VM_CPUS=${SMALLY_VM_CPUS:-2}
VM_ACCEL=${SMALLY_VM_ACCEL:-tcg}
REFERENCE="$REPO/tests/data/all-MiniLM-L6-v2.reference.json"
ANSIBLE_VENV="$REPO/.cache/ansible-venv"
HOST_PY=python3
export ANSIBLE_CONFIG="$REPO/ansible/ansible.cfg"
EXPOSURE_MAX=2.5
STAGE="$RUN/stage"   # the repository's deployment files as a clean clone has them
# The machine's network: a bridge and subnet of its own (the cluster rehearsal's are
# smally-br0 and 10.77.0), so that both rehearsals can run at once.
export SMALLY_MACHINES_BRIDGE=smally-br1 SMALLY_MACHINES_SUBNET=10.77.1
MACHINE_ADDRESS=10.77.1.10

LOG_NAME=rehearse
# shellcheck source=stages.sh
. "$REPO/rehearsal/stages.sh"

# --- the two servers ------------------------------------------------------------------------
# use_target machine|vm: where on_target, check, deploy and the make commands go from now on.
TARGET="" TARGET_SSH=() HTTP_URL="" HTTPS_URL="" HOST_NAME="" MAKE_ON=() VM_SSH_PORT="" QEMU_PID=""
use_target() {
    TARGET=$1
    local host port
    case $1 in
    machine)
        host=$MACHINE_ADDRESS port=22 HOST_NAME=rehearsal-server
        HTTP_URL=http://$MACHINE_ADDRESS HTTPS_URL=https://$MACHINE_ADDRESS
        ;;
    vm)
        host=127.0.0.1 port=$VM_SSH_PORT HOST_NAME=rehearsal-vm
        HTTP_URL=http://127.0.0.1:$VM_HTTP_PORT HTTPS_URL=https://127.0.0.1:$VM_HTTPS_PORT
        ;;
    esac
    TARGET_SSH=(ssh -F /dev/null -o BatchMode=yes -o ConnectTimeout=10 -o LogLevel=ERROR
        -o UserKnownHostsFile="$RUN/known_hosts" -o StrictHostKeyChecking=yes
        -i "$RUN/id_ed25519" -p "$port" "admin@$host" --)
    # The playbooks (make deploy, restart, rollback) from the stage, with its vault.
    MAKE_ON=(make -C "$REPO" --no-print-directory INVENTORY="$RUN/inventory/$1.yml"
        DEPLOY_PLAYBOOK="$STAGE/ansible/site.yml" VAULT_PASSWORD_FILE="$RUN/vault_pass")
    # For the load (stages.sh under_load): one ssh session printing the server's /health every
    # second (through nginx /health names no release).
    LOAD_RELEASE_ARGS=(--release-command "$(printf '%q ' "${TARGET_SSH[@]}" \
        'while sleep 1; do curl -sS --max-time 5 http://127.0.0.1:8000/health; echo; done')")
}
on_target() { # on_target [-t SECONDS] COMMAND: run COMMAND (a shell string) on the target as admin
    local limit=300
    if [ "$1" == -t ]; then
        limit=$2
        shift 2
    fi
    timeout "$limit" "${TARGET_SSH[@]}" "$@"
}
vm_running() { [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; }
vm_stop() {
    vm_running || return 0
    log "powering the VM off"
    use_target vm
    on_target -t 20 "sudo systemctl poweroff" >/dev/null 2>&1 || true
    local i
    for i in $(seq 1 90); do
        vm_running || break
        sleep 1
    done
    if vm_running; then
        log "the VM did not power off within 90 s: stopping qemu"
        kill "$QEMU_PID" 2>/dev/null || true
        sleep 3
        vm_running && kill -9 "$QEMU_PID" 2>/dev/null
    fi
    QEMU_PID=""
}
MACHINE_UP=""
machine_down() {
    [ -n "$MACHINE_UP" ] || return 0
    "$REPO/rehearsal/machines.sh" down "$RUN/machines"
    MACHINE_UP=""
}
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    [ -z "$LOAD_STOP" ] || touch "$LOAD_STOP" # a load still running stops
    if [ "$status" != 0 ] && [ "${SMALLY_REHEARSAL_KEEP:-}" == 1 ] && { vm_running || [ -n "$MACHINE_UP" ]; }; then
        log "SMALLY_REHEARSAL_KEEP=1: the $TARGET stays up for a look:"
        log "  $(printf '%q ' "${TARGET_SSH[@]}")"
        log "  then: kill $QEMU_PID; rm $RUN/overlay.qcow2; rehearsal/machines.sh down $RUN/machines"
        print_times "FAILED (exit $status)"
        exit "$status"
    fi
    vm_stop
    machine_down
    rm -f "$RUN/overlay.qcow2" "$RUN/id_ed25519" "$RUN/vault_pass" "$RUN/tls/privkey.pem"
    if [ "$status" == 0 ]; then print_times PASSED; else print_times "FAILED (exit $status)"; fi
    exit "$status"
}

free_port() {
    "$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- preconditions --------------------------------------------------------------------------
[ "$(id -u)" == 0 ] || die "needs root (debootstrap, nspawn, the image's device nodes, apt-get)"
mkdir -p "$RUN" "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/rehearsal.lock"
flock -n 9 || die "another rehearsal is running (lock $CACHE_ROOT/rehearsal.lock)"
# A run killed before its trap could act may have left its VM or machine behind: stop them.
if [ -s "$RUN/qemu.pid" ] && grep -q qemu-system "/proc/$(cat "$RUN/qemu.pid")/cmdline" 2>/dev/null; then
    log "stopping the VM a previous run left behind"
    kill "$(cat "$RUN/qemu.pid")" || true
    sleep 2
fi
"$REPO/rehearsal/machines.sh" down "$RUN/machines"
find "$RUN" -mindepth 1 -delete
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools ----------------------------------------------------------------------------------
begin tools "qemu, debootstrap, nspawn, ansible and ansible-lint"
install_tools qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils debootstrap:debootstrap mkfs.ext4:e2fsprogs \
    systemd-nspawn:systemd-container nft:nftables ssh:openssh-client openssl:openssl curl:curl flock:util-linux
make -C "$REPO" --no-print-directory ansible-tools
export PATH="$ANSIBLE_VENV/bin:$PATH"
"$ANSIBLE_VENV/bin/ansible" --version | sed -n 1p >&2
[ -f "$REFERENCE" ] || die "no reference vectors at $REFERENCE"
end

begin lint "ansible-lint (production profile), bash -n"
make -C "$REPO" --no-print-directory lint-deploy
end

begin image "the cached Debian 12 base image"
IMAGE=$("$REPO/rehearsal/vm-image.sh" | tail -n 1)
[ -e "$IMAGE/ready" ] || die "no base image"
end

begin machine "the machine: an nspawn overlay of $IMAGE at $MACHINE_ADDRESS"
mkdir -p "$RUN/tls" "$RUN/inventory"
ssh-keygen -q -t ed25519 -N '' -C "smally-rehearsal-$$" -f "$RUN/id_ed25519"
echo "$MACHINE_ADDRESS $(cut -d' ' -f1,2 "$IMAGE/ssh_host_ed25519_key.pub")" >"$RUN/known_hosts"
MACHINE_UP=yes
"$REPO/rehearsal/machines.sh" up "$RUN/machines" "$RUN/id_ed25519" "rehearsal-server=$MACHINE_ADDRESS"
use_target machine
on_target 'echo "machine: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r) (the host'"'"'s), systemd $(systemctl is-system-running)"' >&2 || true
end

begin build "make build (x86_64)"
if [ "${SMALLY_SKIP_BUILD:-}" == 1 ]; then
    log "SMALLY_SKIP_BUILD=1: using dist/ as it is"
else
    make -C "$REPO" --no-print-directory build
fi
end

# --- deploy ---------------------------------------------------------------------------------
begin deploy "make deploy to the machine with a test inventory and vault"
# The deployment files as a clean clone has them: tracked and new files, never git-ignored ones
# (a developer's real vault.yml or inventory stays out of the rehearsal).
mkdir -p "$STAGE"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard -- ansible nginx systemd scripts) |
        while IFS= read -r -d '' file; do
            [ -f "$REPO/$file" ] && install -D -m "$(stat -c %a "$REPO/$file")" "$REPO/$file" "$STAGE/$file"
        done
else
    cp -a "$REPO/ansible" "$REPO/nginx" "$REPO/systemd" "$REPO/scripts" "$STAGE/"
    rm -f "$STAGE/ansible/group_vars/all/vault.yml" "$STAGE/ansible/inventory/hosts.yml" "$STAGE/ansible/.vault_pass"
fi
# The x86_64 build, copied: a `make build` started elsewhere meanwhile cannot pull it away.
mkdir -p "$STAGE/dist"
cp -a "$REPO/dist/api" "$REPO/dist/create_api_key" "$REPO/dist/models" "$REPO/dist/BUILD.json" "$STAGE/dist/" 2>/dev/null ||
    log "dist/ is incomplete: the playbook's preflight will say what to build"

# A TLS certificate for smally.test, 127.0.0.1 (the VM's forwarded ports) and the machine,
# placed where certbot's would be.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=smally.test" -addext "subjectAltName=DNS:smally.test,IP:127.0.0.1,IP:$MACHINE_ADDRESS" \
    -keyout "$RUN/tls/privkey.pem" -out "$RUN/tls/fullchain.pem" 2>/dev/null
install_certificate() {
    on_target "sudo install -d -m 0755 /etc/ssl/smally && sudo tee /etc/ssl/smally/fullchain.pem >/dev/null" <"$RUN/tls/fullchain.pem"
    on_target "sudo install -m 0600 /dev/stdin /etc/ssl/smally/privkey.pem" <"$RUN/tls/privkey.pem"
}
install_certificate

# The vault, encrypted, with a password made for this run.
openssl rand -hex 24 >"$RUN/vault_pass"
printf -- '---\nvault_smally_db_password: "%s"\nvault_smally_redis_password: "%s"\n' \
    "$(openssl rand -hex 24)" "$(openssl rand -hex 24)" >"$STAGE/ansible/group_vars/all/vault.yml"
ansible-vault encrypt --vault-password-file "$RUN/vault_pass" "$STAGE/ansible/group_vars/all/vault.yml" >/dev/null
write_inventory() { # write_inventory TARGET NAME ADDRESS PORT
    cat >"$RUN/inventory/$1.yml" <<EOF
---
all:
  children:
    smally:
      hosts:
        $2:
          ansible_host: $3
          ansible_port: $4
          ansible_user: admin
          ansible_ssh_private_key_file: $RUN/id_ed25519
          ansible_ssh_common_args: >-
            -F /dev/null -o UserKnownHostsFile=$RUN/known_hosts -o StrictHostKeyChecking=yes
      vars:
        smally_server_name: smally.test
        smally_tls_certificate: /etc/ssl/smally/fullchain.pem
        smally_tls_certificate_key: /etc/ssl/smally/privkey.pem
EOF
}
write_inventory machine rehearsal-server "$MACHINE_ADDRESS" 22
export ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 ANSIBLE_SSH_CONTROL_PATH_DIR="$RUN/cp"
deploy() { # deploy LOG: make deploy to the target, its output kept in LOG; prints the recap line
    local logfile=$1
    timeout 40m "${MAKE_ON[@]}" deploy >"$logfile" 2>&1 ||
        { tail -n 60 "$logfile" >&2; die "the playbook failed (full log: $logfile)"; }
    grep -E "^$HOST_NAME +: ok=" "$logfile" | tail -n 1
}
recap=$(deploy "$RUN/deploy-1.log")
log "first run: $recap"
grep -A12 'Show the diagnostics' "$RUN/deploy-1.log" | grep -E 'ELF|=>|libc|api [0-9]' | sed 's/^ */    /' >&2 || true
[[ "$recap" =~ failed=0 ]] && [[ "$recap" =~ unreachable=0 ]] || die "first run: $recap"
end

# --- checks from the host, through nginx ----------------------------------------------------
check() { "$HOST_PY" "$REPO/rehearsal/check_http.py" "$@" --https "$HTTPS_URL" \
    --http "$HTTP_URL" --ca "$RUN/tls/fullchain.pem" --reference "$REFERENCE"; }
create_key() { # create_key EMAIL TIER: make create-key over ssh; prints the key
    local key
    key=$(timeout 180 "${MAKE_ON[@]}" create-key EMAIL="$1" TIER="$2" 2>"$RUN/create-key.err") ||
        { cat "$RUN/create-key.err" >&2; die "make create-key $1 failed"; }
    [[ "$key" =~ ^sk_[0-9a-f]{64}$ ]] || die "make create-key printed '$key', not a key alone"
    echo "$key"
}

# The load's own user: the ledger must end up with exactly the embeddings its 200s got.
LOAD_EMAIL=load@rehearsal.test
LOAD_KEY=""
LOAD_RATE=8 # under limit_req
load_ledger() {
    on_target "sudo -u postgres psql -d smally -Atc \"SELECT coalesce(sum(u.embeddings_count), 0) FROM usage u
        JOIN users s ON s.id = u.user_id WHERE s.email = '$LOAD_EMAIL'\""
}
# The service names its release to callers on its own machine only (through nginx /health is the
# status alone): read on the server, over ssh.
serving_release() { # the release the server's /health names
    on_target 'curl -sS http://127.0.0.1:8000/health' |
        "$HOST_PY" -c 'import json, sys; print(json.load(sys.stdin)["build"]["release"])'
}

begin checks "health, keys, reference vectors, headers, limits, /metrics, port 80"
check health
KEY1=$(create_key alice@rehearsal.test pro)
log "make create-key over ssh printed a key: ${KEY1:0:11}..."
check embed --key "$KEY1"
# Two Redis servers with the policies the README promises; the L2 cache filled the cache's one.
on_target 'sudo bash -s' <"$REPO/rehearsal/redis-check.sh" >"$RUN/redis.txt" 2>&1 ||
    { cat "$RUN/redis.txt" >&2; die "rehearsal/redis-check.sh failed"; }
sed 's/^/    /' "$RUN/redis.txt" >&2
grep -qx 'REDIS_URL policy=noeviction save=\[\] keys=[0-9]* anonymous=NOAUTH' "$RUN/redis.txt" ||
    die "the counters' Redis is not as promised"
grep -qx 'CACHE_REDIS_URL policy=allkeys-lru save=\[\] keys=[1-9][0-9]* anonymous=NOAUTH' "$RUN/redis.txt" ||
    die "the cache's Redis is not as promised, or holds no cached vector"
log "Redis: counters noeviction, cache allkeys-lru with the vectors, nothing on disk, both need the password"
check headers
check metrics
inside=$(on_target 'curl -sS --cacert /etc/ssl/smally/fullchain.pem https://127.0.0.1/metrics' || true)
grep -q '^smally_build_info' <<<"$inside" || die "/metrics through nginx from the VM itself: ${inside:0:200}"
log "/metrics through nginx from the VM itself: served ($(grep -c '^smally_' <<<"$inside") samples)"
check burst --count 80 --parallel 20
# limit_req's bucket drains at the site's rate: the next checks must not meet the burst's 429s
# (the machine gets there within a second).
rate=$(sed -n 's/^smally_rate_limit: *\([0-9]*\)r\/s$/\1/p' "$STAGE/ansible/roles/smally/defaults/main.yml")
burst=$(sed -n 's/^smally_rate_burst: *\([0-9]*\)$/\1/p' "$STAGE/ansible/roles/smally/defaults/main.yml")
[[ "$rate" =~ ^[1-9][0-9]*$ && "$burst" =~ ^[0-9]+$ ]] || die "no smally_rate_limit/smally_rate_burst in the defaults"
sleep $((burst / rate + 2))
max_bytes=$(sed -n 's/^smally_max_request_bytes: *\([0-9]*\)$/\1/p' "$STAGE/ansible/roles/smally/defaults/main.yml")
check too-large --key "$KEY1" --max-bytes "$max_bytes"
# nginx's own 502 with the service (and its socket) stopped, then the service back.
on_target 'sudo systemctl stop smally.socket smally'
check down
on_target 'sudo systemctl start smally.socket smally && sudo /home/smally/smally-api/scripts/health-check.sh --wait 120' \
    >"$RUN/down-and-back.txt" 2>&1 || { cat "$RUN/down-and-back.txt" >&2; die "the service did not come back"; }
# nginx's limits take an IPv6 /64 as one client: proven on the VM, whose loopback takes any
# address (the host reaches the VM over IPv4 only), with the limit_conn the site was given.
conn_limit=$(on_target "sed -n 's/^ *limit_conn smally_conn \([0-9]*\);$/\1/p' /etc/nginx/sites-available/smally")
[[ "$conn_limit" =~ ^[0-9]+$ ]] || die "no limit_conn in the deployed site: '$conn_limit'"
on_target "sudo python3 - $conn_limit" <"$REPO/rehearsal/ipv6-limit.py" >"$RUN/ipv6-limit.txt" 2>&1 ||
    { cat "$RUN/ipv6-limit.txt" >&2; die "rehearsal/ipv6-limit.py: the /64 is not one client"; }
log "$(tail -n 1 "$RUN/ipv6-limit.txt")"
token=rehearsal-$$
on_target "echo $token-content | sudo tee /var/www/letsencrypt/.well-known/acme-challenge/$token >/dev/null"
check http --acme-token "$token:$token-content"
# The first deployment of a real server has no certificate yet: the site without TLS must be
# valid nginx too (rendered from the same template, checked by nginx -t in the VM).
ANSIBLE_SSH_CONTROL_PATH_DIR="$RUN/cp" ansible "$HOST_NAME" -i "$RUN/inventory/$TARGET.yml" -b \
    -m ansible.builtin.template -a "src=$STAGE/nginx/smally.conf dest=/tmp/smally-plain.conf mode=0644" \
    -e "@$STAGE/ansible/roles/smally/defaults/main.yml" -e "@$STAGE/ansible/vars/smally.yml" -e '{"smally_tls_certificate": ""}' >"$RUN/plain-site.log" 2>&1 ||
    { cat "$RUN/plain-site.log" >&2; die "rendering the site without TLS failed"; }
on_target 'printf "events {}\nhttp { include /etc/nginx/mime.types; include /tmp/smally-plain.conf; }\n" >/tmp/nginx-plain.conf &&
    sudo nginx -t -q -c /tmp/nginx-plain.conf' >"$RUN/plain-site.out" 2>&1 ||
    { cat "$RUN/plain-site.out" >&2; die "the site without TLS fails nginx -t"; }
on_target 'grep -q "listen 443" /tmp/smally-plain.conf' && die "the site without TLS still has a 443 server"
log "the site without TLS (first deployment) passes nginx -t and has no 443 server"
timeout 180 "${MAKE_ON[@]}" health >"$RUN/health.out" 2>&1 || { cat "$RUN/health.out" >&2; die "make health failed"; }
sed 's/^/    /' "$RUN/health.out" >&2
end

begin redeploy "the playbook again: changed=0"
recap=$(deploy "$RUN/deploy-2.log")
log "second run: $recap"
if ! [[ "$recap" =~ changed=0 ]] || ! [[ "$recap" =~ failed=0 ]]; then
    grep -E '^changed:' "$RUN/deploy-2.log" >&2 || true
    die "second run is not idempotent: $recap"
fi
end

begin restart "make restart under load: no request fails, data and keys survive"
usage_before=$(on_target "sudo -u postgres psql -d smally -Atc 'SELECT count(*) FROM usage'")
LOAD_KEY=$(create_key "$LOAD_EMAIL" scale)
RELEASE_A=$(serving_release)
under_load restart timeout 300 "${MAKE_ON[@]}" restart
tail -n 1 "$RUN/restart.out" >&2
log "zero-downtime restart: $LOAD"
check health
check key-ok --key "$KEY1"
usage_after=$(on_target "sudo -u postgres psql -d smally -Atc 'SELECT count(*) FROM usage'")
[ "$usage_after" -ge "$usage_before" ] && [ "$usage_before" -gt 0 ] ||
    die "usage rows before the restart $usage_before, after $usage_after"
on_target "sudo journalctl -u smally --no-pager -o cat | grep -E 'Deactivated successfully|Failed with result'" >"$RUN/stops.txt" || true
grep -q 'Failed with result' "$RUN/stops.txt" && die "the service did not stop cleanly: $(cat "$RUN/stops.txt")"
log "usage ledger: $usage_before rows before the restart, $usage_after after; the stop exited 0"
# make logs follows the journal until interrupted: 20 seconds of it must show the JSON log lines.
timeout 20 "${MAKE_ON[@]}" logs LOG_LINES=20 >"$RUN/logs.out" 2>&1 || true
grep -q '"logger":' "$RUN/logs.out" || { cat "$RUN/logs.out" >&2; die "make logs showed no log lines"; }
log "make logs: $(grep -c '"logger":' "$RUN/logs.out") JSON log lines in 20 s"
end

begin rotate "the database password rotated: ansible-vault edit, make deploy (docs/operations.md)"
old_db_password=$(ANSIBLE_VAULT_PASSWORD_FILE="$RUN/vault_pass" "$ANSIBLE_VENV/bin/ansible-vault" view \
    "$STAGE/ansible/group_vars/all/vault.yml" | sed -n 's/^vault_smally_db_password: "\(.*\)"$/\1/p')
[[ "$old_db_password" =~ ^[0-9a-f]{48}$ ]] || die "no database password found in the vault"
new_db_password=$(openssl rand -hex 24)
# The runbook's command, with sed for the operator's editor.
ANSIBLE_VAULT_PASSWORD_FILE="$RUN/vault_pass" EDITOR="sed -i s/$old_db_password/$new_db_password/" "$ANSIBLE_VENV/bin/ansible-vault" edit "$STAGE/ansible/group_vars/all/vault.yml"
recap=$(deploy "$RUN/deploy-rotate.log")
[[ "$recap" =~ failed=0 ]] && ! [[ "$recap" =~ changed=0 ]] || die "the deploy with the new password: $recap"
check health
check key-ok --key "$KEY1"
if on_target "PGPASSWORD=$old_db_password psql -h 127.0.0.1 -U smally -d smally -Atc 'SELECT 1'" >/dev/null 2>&1; then
    die "the old database password still opens a session"
fi
timeout 120 "${MAKE_ON[@]}" api ARGS='migrate --status' >"$RUN/migrate-status-rotated.out" 2>&1 ||
    { cat "$RUN/migrate-status-rotated.out" >&2; die "api migrate --status with the rotated password failed"; }
log "database password rotated ($recap): the old one is refused, the service and the scripts use the new one"
end

begin build-b "a second build of the tree: release B"
if [ "${SMALLY_SKIP_BUILD:-}" == 1 ]; then log "SMALLY_SKIP_BUILD=1: release B is built all the same"; fi
# Same commit, a later build time: another release name (app/buildinfo.py release_name).
make -C "$REPO" --no-print-directory build >"$RUN/build-b.log" 2>&1 || { tail -n 30 "$RUN/build-b.log" >&2; die "the build of release B failed"; }
cp -a "$REPO/dist/api" "$REPO/dist/create_api_key" "$REPO/dist/BUILD.json" "$STAGE/dist/"
RELEASE_B=$("$HOST_PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["release"])' "$STAGE/dist/BUILD.json")
[ "$RELEASE_B" != "$RELEASE_A" ] || die "the rebuild has the release name of the first build: $RELEASE_A"
log "release A (serving): $RELEASE_A; release B (built): $RELEASE_B"
end

# make_releases N SERVING OTHER: `make releases` lists both and marks SERVING as the serving one.
make_releases() {
    local out="$RUN/releases-$1.out"
    timeout 120 "${MAKE_ON[@]}" releases >"$out" 2>&1 || { cat "$out" >&2; die "make releases failed"; }
    sed 's/^/    /' "$out" >&2
    grep -qx "\* $2 (serving)" "$out" && grep -qx "  $3" "$out" ||
        die "make releases does not list $3 and mark $2 serving"
}
begin releases "under load: make deploy of B, make rollback to A; make releases"
under_load deploy-b deploy "$RUN/deploy-3.log"
recap=$(grep -E "^$HOST_NAME +: ok=" "$RUN/deploy-3.log" | tail -n 1)
[[ "$recap" =~ failed=0 ]] || die "the deploy of B: $recap"
[ "$(serving_release)" == "$RELEASE_B" ] || die "after the deploy of B, /health names $(serving_release)"
log "zero-downtime deploy: $LOAD"
make_releases 1 "$RELEASE_B" "$RELEASE_A"
under_load rollback timeout 300 "${MAKE_ON[@]}" rollback
grep -q "rollback: serving $RELEASE_A\"" "$RUN/rollback.out" || { cat "$RUN/rollback.out" >&2; die "make rollback did not say it serves $RELEASE_A"; }
[ "$(serving_release)" == "$RELEASE_A" ] || die "after make rollback, /health names $(serving_release)"
log "rollback: serving $RELEASE_A, $LOAD"
make_releases 2 "$RELEASE_A" "$RELEASE_B"
# The ledger is written in batches, every second (app/serving/usage.py): wait for the last one.
for _ in $(seq 30); do
    ledger=$(load_ledger)
    [ "$ledger" == "$LOAD_200S" ] && break
    sleep 1
done
[ "$ledger" == "$LOAD_200S" ] || die "usage ledger: $ledger embeddings for $LOAD_EMAIL, its load got $LOAD_200S 200s"
log "usage ledger under load: $ledger embeddings recorded for the $LOAD_200S 200s of the restart, deploy and rollback"
end

begin operate "the runbook's commands: keys, usage, migrations, diagnostics, certbot"
api_failed() { # api_failed NAME: a `make api` (docs/operations.md's commands, as written) failed
    cat "$RUN/$1.out" >&2
    die "make api ($1) failed"
}
timeout 180 "${MAKE_ON[@]}" api ARGS="keys list alice@rehearsal.test" >"$RUN/keys-list.out" 2>&1 || api_failed keys-list
grep -q "^${KEY1:0:11}[[:space:]]active" "$RUN/keys-list.out" || { cat "$RUN/keys-list.out" >&2; die "keys list does not show alice's key"; }
timeout 180 "${MAKE_ON[@]}" api ARGS="usage alice@rehearsal.test --month $(date -u +%Y-%m)" >"$RUN/usage.out" 2>&1 || api_failed usage
grep -Eq '^total +[1-9][0-9]* +[1-9]' "$RUN/usage.out" || { cat "$RUN/usage.out" >&2; die "usage shows no embeddings for alice"; }
KEY_REVOKED=$(create_key revoked@rehearsal.test free)
check key-ok --key "$KEY_REVOKED"
timeout 180 "${MAKE_ON[@]}" api ARGS="keys revoke ${KEY_REVOKED:0:11}" >"$RUN/keys-revoke.out" 2>&1 || api_failed keys-revoke
grep -qx "revoked ${KEY_REVOKED:0:11}" "$RUN/keys-revoke.out" || { cat "$RUN/keys-revoke.out" >&2; die "keys revoke said otherwise"; }
sleep 11 # AUTH_CACHE_TTL (10 s): a revoked key is refused within it
check key-refused --key "$KEY_REVOKED"
timeout 180 "${MAKE_ON[@]}" api ARGS='migrate --status' >"$RUN/migrate-status-1.out" 2>&1 || api_failed migrate-status-1
grep -q pending "$RUN/migrate-status-1.out" && die "a migration is pending: $(cat "$RUN/migrate-status-1.out")"
timeout 180 "${MAKE_ON[@]}" api ARGS='migrate --rollback' >"$RUN/migrate-rollback.out" 2>&1 || api_failed migrate-rollback
grep -q 'rolled back$' "$RUN/migrate-rollback.out" || { cat "$RUN/migrate-rollback.out" >&2; die "migrate --rollback reverted nothing"; }
reverted=$(grep 'rolled back$' "$RUN/migrate-rollback.out" | cut -f1)
timeout 300 "${MAKE_ON[@]}" restart >"$RUN/restart-migrate.out" 2>&1 || { cat "$RUN/restart-migrate.out" >&2; die "make restart failed"; }
timeout 180 "${MAKE_ON[@]}" api ARGS='migrate --status' >"$RUN/migrate-status-2.out" 2>&1 || api_failed migrate-status-2
grep -q pending "$RUN/migrate-status-2.out" && die "the restart did not re-apply $reverted"
# The month's invoice input: alice has a row, and the rows add up to the ledger (the restart
# above flushed it).
month=$(date -u +%Y-%m)
(cd "$RUN" && timeout 180 "${MAKE_ON[@]}" usage-export MONTH="$month" > usage.csv ) || { cat "$RUN/usage.csv" >&2; die "make usage-export failed"; }
exported=$(awk -F, 'NR > 1 { sum += $4 } END { print sum + 0 }' "$RUN/usage.csv")
ledger=$(on_target "cd / && sudo -u postgres psql -d smally -XAtc \"SELECT coalesce(sum(embeddings_count), 0) FROM usage WHERE created_at >= date_trunc('month', now(), 'UTC')\"")
head -n 1 "$RUN/usage.csv" | grep -qx 'month,email,tier,embeddings,tokens,limit' && grep -q "^$month,alice@rehearsal.test,pro,[1-9]" "$RUN/usage.csv" &&
    [ "$exported" == "$ledger" ] || { cat "$RUN/usage.csv" >&2; die "make usage-export: $exported embeddings, the ledger $ledger"; }
log "make api: keys list, usage, keys revoke (refused after 11 s), migrate --status, --rollback of $reverted (re-applied by a restart); make usage-export: $(($(wc -l <"$RUN/usage.csv") - 1)) users, $exported embeddings = the ledger's"
# The troubleshooting commands, on the healthy server: what each shows when all is well.
on_target 'sudo systemctl status smally --no-pager' >"$RUN/status.out" 2>&1 || true
grep -q 'Active: active (running)' "$RUN/status.out" || { cat "$RUN/status.out" >&2; die "systemctl status smally"; }
on_target 'sudo systemctl status smally.socket --no-pager' >"$RUN/status-socket.out" 2>&1 || true
grep -q 'Active: active' "$RUN/status-socket.out" || { cat "$RUN/status-socket.out" >&2; die "systemctl status smally.socket"; }
on_target 'sudo file -L /home/smally/smally-api/current/api' >"$RUN/file.out"
grep -q 'ELF 64-bit.*x86-64' "$RUN/file.out" || die "file -L current/api: $(cat "$RUN/file.out")"
on_target 'sudo ldd /home/smally/smally-api/current/api' >"$RUN/ldd.out" 2>&1 || true
grep -q 'libc.so.6' "$RUN/ldd.out" && ! grep -q 'not found' "$RUN/ldd.out" || { cat "$RUN/ldd.out" >&2; die "ldd current/api"; }
on_target 'curl -sS http://127.0.0.1:8000/health' >"$RUN/health-direct.out"
grep -q '"status":"healthy"' "$RUN/health-direct.out" || die "curl /health: $(cat "$RUN/health-direct.out")"
on_target 'sudo journalctl -u smally -n 50 --no-pager' >"$RUN/journal.out"
grep -q '"logger":' "$RUN/journal.out" || die "journalctl -u smally shows no log lines"
on_target 'sudo certbot renew' >"$RUN/certbot.out" 2>&1 || { cat "$RUN/certbot.out" >&2; die "certbot renew failed"; }
[ "$(on_target 'systemctl is-enabled certbot.timer')" == enabled ] || die "certbot.timer is not enabled"
on_target 'test -x /etc/letsencrypt/renewal-hooks/deploy/smally-reload-nginx' || die "no certbot deploy hook for nginx"
log "troubleshooting commands: status, socket, file, ldd, /health, journal; certbot renew and its timer"
end

begin restore "make backup, a new key, restore.sh --yes"
backup=$(timeout 300 "${MAKE_ON[@]}" backup 2>"$RUN/backup.err" | tail -n 1) || { cat "$RUN/backup.err" >&2; die "make backup failed"; }
[[ "$backup" == /home/smally/backups/smally-*.sql.gz ]] || die "make backup printed '$backup'"
log "make backup (smally-backup.service): $backup"
KEY2=$(create_key bob@rehearsal.test free)
check key-ok --key "$KEY2"
# A hostile backup (tests/system/test_restore.py has the same): a shell command for psql, a
# program for the server, the app's role made a superuser. restore.sh must refuse it, having
# run nothing and changed nothing.
marks=/var/lib/postgresql/restore-by
printf '%s\n' "\\! touch $marks-psql" 'RESET ROLE;' "COPY (SELECT 1) TO PROGRAM 'touch $marks-server';" \
    'ALTER ROLE "smally" SUPERUSER;' | gzip | on_target 'cat > /tmp/hostile.sql.gz'
if on_target -t 300 "sudo /home/smally/smally-api/scripts/restore.sh /tmp/hostile.sql.gz --yes" >"$RUN/hostile.out" 2>&1; then
    cat "$RUN/hostile.out" >&2
    die "restore.sh loaded a hostile backup"
fi
grep -q 'the backup did not load; nothing was changed' "$RUN/hostile.out" ||
    { cat "$RUN/hostile.out" >&2; die "restore.sh failed otherwise than refusing the hostile backup"; }
ran=$(on_target "sudo ls $marks-psql $marks-server 2>/dev/null | wc -l")
superuser=$(on_target "cd / && sudo -u postgres psql -XAtc \"SELECT rolsuper FROM pg_roles WHERE rolname = 'smally'\"")
[ "$ran" == 0 ] && [ "$superuser" == f ] ||
    die "the hostile backup ran $ran commands; the app's role superuser: $superuser"
check key-ok --key "$KEY2"
log "hostile backup: refused, 0 commands run, the app's role superuser: $superuser"
on_target -t 600 "sudo /home/smally/smally-api/scripts/restore.sh '$backup' --yes" >"$RUN/restore.out" 2>&1 ||
    { cat "$RUN/restore.out" >&2; die "restore.sh failed"; }
sed 's/^/    /' "$RUN/restore.out" >&2
# The restored database hands out user ids again: no vector cached for the replaced one stays.
on_target 'sudo bash -s' <"$REPO/rehearsal/redis-check.sh" >"$RUN/redis-restored.txt" 2>&1 ||
    { cat "$RUN/redis-restored.txt" >&2; die "rehearsal/redis-check.sh failed"; }
grep -q '^CACHE_REDIS_URL .* keys=0 ' "$RUN/redis-restored.txt" ||
    { cat "$RUN/redis-restored.txt" >&2; die "the cache's Redis kept vectors across the restore"; }
log "after the restore: $(grep '^CACHE_REDIS_URL' "$RUN/redis-restored.txt")"
check key-refused --key "$KEY2"
check key-ok --key "$KEY1"
check health
end

# --- the VM: what needs a kernel of its own -------------------------------------------------
begin launch "the machine off; qemu on a fresh overlay of $IMAGE"
machine_down
VM_SSH_PORT=$(free_port)
VM_HTTP_PORT=$(free_port)
VM_HTTPS_PORT=$(free_port)
echo "[127.0.0.1]:$VM_SSH_PORT $(cut -d' ' -f1,2 "$IMAGE/ssh_host_ed25519_key.pub")" >>"$RUN/known_hosts"
qemu-img create -q -f qcow2 -b "$IMAGE/base.qcow2" -F qcow2 "$RUN/overlay.qcow2"
# -cpu max, minus 5-level paging: with la57 every TLB miss walks one more level in software,
# which made apt installs and the boot in the VM twice as slow. Minus AVX, AVX2 and FMA too:
# qemu emulates them instruction by instruction, and onnxruntime, glibc and OpenSSL pick them
# when offered. A server without AVX is a real x86-64 too (x86-64-v2), so the rehearsal still
# runs the binaries as built.
cpu=max,la57=off,avx=off,avx2=off,fma=off
[ "$VM_ACCEL" == tcg ] || cpu=host
qemu-system-x86_64 \
    -name smally-rehearsal -machine q35 -accel "$VM_ACCEL" -cpu "$cpu" \
    -smp "$VM_CPUS" -m "$VM_MEMORY" -nodefaults -display none -no-reboot \
    -kernel "$IMAGE/vmlinuz" -initrd "$IMAGE/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 net.ifnames=0 smally.authorized_key=$(base64 -w0 <"$RUN/id_ed25519.pub")" \
    -drive "file=$RUN/overlay.qcow2,if=virtio,format=qcow2,cache=unsafe,discard=unmap" \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$VM_SSH_PORT-:22,hostfwd=tcp:127.0.0.1:$VM_HTTP_PORT-:80,hostfwd=tcp:127.0.0.1:$VM_HTTPS_PORT-:443" \
    -device virtio-net-pci,netdev=net0,romfile= \
    -device virtio-rng-pci \
    -serial "file:$RUN/console.log" -pidfile "$RUN/qemu.pid" -daemonize
QEMU_PID=$(cat "$RUN/qemu.pid")
log "qemu $QEMU_PID ($VM_ACCEL, $VM_CPUS CPUs, $VM_MEMORY MiB): ssh 127.0.0.1:$VM_SSH_PORT, http :$VM_HTTP_PORT, https :$VM_HTTPS_PORT"
use_target vm
end

begin boot "wait for SSH in the VM"
booted=no
for _ in $(seq 1 100); do
    vm_running || { tail -n 30 "$RUN/console.log" >&2; die "qemu exited during boot"; }
    if on_target -t 15 true 2>/dev/null; then
        booted=yes
        break
    fi
    sleep 3
done
[ "$booted" == yes ] || { tail -n 30 "$RUN/console.log" >&2; die "no SSH within 5 minutes (console: $RUN/console.log)"; }
on_target 'echo "VM: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r), $(nproc) CPUs"' >&2
end

begin vm-deploy "make deploy to the VM; health, a key and the reference vectors through nginx"
install_certificate
write_inventory vm rehearsal-vm 127.0.0.1 "$VM_SSH_PORT"
recap=$(deploy "$RUN/deploy-vm.log")
log "the VM: $recap"
[[ "$recap" =~ failed=0 ]] && [[ "$recap" =~ unreachable=0 ]] || die "the VM's deployment: $recap"
check health
check embed --key "$(create_key vm@rehearsal.test pro)"
VM_RELEASE=$(serving_release)
end

begin security "systemd-analyze security, and the unit the service runs under"
on_target "sudo systemd-analyze security --no-pager smally.service" >"$RUN/security.txt" 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for smally.service: \([0-9.]*\).*/\1/p' "$RUN/security.txt")
[ -n "$exposure" ] || { cat "$RUN/security.txt" >&2; die "no exposure level from systemd-analyze"; }
grep -E '✗' "$RUN/security.txt" | sed 's/^/    /' >&2 || true
log "systemd-analyze security smally.service: exposure $exposure (at most $EXPOSURE_MAX)"
awk -v e="$exposure" -v m="$EXPOSURE_MAX" 'BEGIN { exit !(e <= m) }' || die "exposure $exposure is above $EXPOSURE_MAX"
backup_exposure=$(on_target "sudo systemd-analyze security --no-pager smally-backup.service" 2>&1 |
    sed -n 's/.*Overall exposure level for smally-backup.service: \([0-9.]*\).*/\1/p')
log "systemd-analyze security smally-backup.service: exposure $backup_exposure"
# This kernel enforces the units' IP filters: in smally-backup.service's sandbox (localhost
# only) the VM's own private address is out of reach; admitted, as a cluster's drop-in admits
# the data host, it is reached.
vm_address=$(on_target "ip -4 -o addr show scope global | awk '{ sub(\"/.*\", \"\", \$4); print \$4; exit }'")
[ -n "$vm_address" ] || die "the VM has no global IPv4 address"
probe() { # probe ALLOWED...: whether a unit admitting ALLOWED reaches the VM's sshd on vm_address
    on_target "sudo systemd-run --quiet --wait --pipe -p IPAddressDeny=any ${*/#/-p IPAddressAllow=} \
        timeout 5 bash -c 'echo >/dev/tcp/$vm_address/22'" 2>/dev/null
}
if probe localhost; then die "IP filters are not enforced on the VM: localhost-only reached $vm_address"; fi
probe localhost "$vm_address" || die "a unit admitting $vm_address does not reach it"
denied=$(on_target 'systemctl show smally-backup -p IPAddressDeny --value')
allowed=$(on_target 'systemctl show smally-backup -p IPAddressAllow --value')
[[ " $denied " == *" 0.0.0.0/0 "* && " $denied " == *" ::/0 "* ]] || die "smally-backup.service denies: $denied"
log "IP filters enforced: localhost-only cannot reach $vm_address, admitted it can; smally-backup.service denies $denied, allows $allowed"
on_target 'sudo systemctl show smally -p ActiveState -p SubState -p FragmentPath -p DropInPaths -p NeedDaemonReload -p MainPID -p NRestarts
    pid=$(systemctl show smally -p MainPID --value)
    echo "Exe=$(sudo readlink /proc/$pid/exe)"
    sudo grep -E "^(NoNewPrivs|Seccomp|CapEff|CapBnd):" /proc/$pid/status | tr -d "\t" | tr ":" "="
    echo "Unit=$(sha256sum </etc/systemd/system/smally.service | cut -c1-64)"
    systemctl show smally.socket -p ActiveState -p Listen -p Backlog -p DropInPaths | sed "s/^/Socket/"' >"$RUN/unit.txt"
sed 's/^/    /' "$RUN/unit.txt" >&2
want=$(sha256sum <"$REPO/systemd/smally.service" | cut -c1-64)
for expected in ActiveState=active SubState=running FragmentPath=/etc/systemd/system/smally.service \
    DropInPaths= NeedDaemonReload=no NRestarts=0 "Exe=/home/smally/smally-api/releases/$VM_RELEASE/api" \
    NoNewPrivs=1 Seccomp=2 CapEff=0000000000000000 CapBnd=0000000000000000 "Unit=$want" \
    SocketActiveState=active "SocketListen=127.0.0.1:8000 (Stream)" SocketBacklog=4096 SocketDropInPaths=; do
    grep -qx -- "$expected" "$RUN/unit.txt" || die "the running service does not show $expected"
done
log "the service runs under exactly systemd/smally.service: no drop-ins, no restarts, seccomp on, no capabilities; release $VM_RELEASE on smally.socket"
end

begin poweroff "power the VM off and delete its overlay"
vm_stop
rm -f "$RUN/overlay.qcow2"
[ ! -e "$RUN/overlay.qcow2" ] || die "the overlay is still there"
end

log "PASSED: exposure $exposure; first deployment $(grep -o 'changed=[0-9]*' "$RUN/deploy-1.log" | tail -n 1), second changed=0"
