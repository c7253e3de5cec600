#!/usr/bin/env bash
# The releases on the server: each build in releases/<release>/ (api, create_api_key, models/,
# BUILD.json), `current` the symlink to the one serving (ansible/site.yml uploads them and runs
# `switch` and `prune`; `make releases` runs `list`; ansible/operate.yml, behind `make rollback`,
# runs `target` on every API host, then `rollback` on each in turn).
#
#   sudo /home/smally/smally-api/scripts/releases.sh list
#   sudo /home/smally/smally-api/scripts/releases.sh rollback [RELEASE]
#   sudo /home/smally/smally-api/scripts/releases.sh target [RELEASE]   (what rollback would serve)
#   sudo /home/smally/smally-api/scripts/releases.sh switch RELEASE     (the symlink only)
#   sudo /home/smally/smally-api/scripts/releases.sh prune KEEP
#
# Order: by build time, the last part of a release's name (<version>-<hash>[-dirty]-<time>,
# app/buildinfo.py release_name). `rollback` without RELEASE goes to the newest release built
# before the serving one; it switches `current`, restarts the service (smally.socket keeps
# the listening socket, so no request is refused meanwhile) and waits until /health where the
# service listens (common.sh health_url) names the release. On a cluster `make rollback` runs it
# on each API host in turn, drained at the edge (ansible/operate.yml). `prune` removes all but
# the KEEP newest, never the serving one.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

releases_dir=$SMALLY_APP_DIR/releases
current=$SMALLY_APP_DIR/current
systemctl_cmd=${SMALLY_SYSTEMCTL:-systemctl}

usage() {
    sed -n '6,10s/^#   //p' "$0" >&2
    exit 2
}

built_at() { # built_at NAME: the sort key, the build time at the end of the name (else 0)
    local last=${1##*-}
    if [[ "$last" =~ ^[0-9]{8}T[0-9]{6}Z$ ]]; then echo "$last"; else echo 0; fi
}

# The releases, oldest first (ties: by name).
releases() {
    local dir name
    [ -d "$releases_dir" ] || return 0
    for dir in "$releases_dir"/*/; do
        [ -d "$dir" ] || continue
        name=$(basename "$dir")
        printf '%s %s\n' "$(built_at "$name")" "$name"
    done | sort | cut -d' ' -f2
}

serving() { # the release `current` points to (empty when none)
    [ -L "$current" ] || return 0
    basename "$(readlink "$current")"
}

exists() { [ -n "$1" ] && [[ "$1" != */* ]] && [ -d "$releases_dir/$1" ] && [ -x "$releases_dir/$1/api" ]; }

cmd_list() {
    local name now
    now=$(serving)
    [ -n "$(releases)" ] || die "no release in $releases_dir (deploy first)"
    releases | while read -r name; do
        if [ "$name" == "$now" ]; then printf '* %s (serving)\n' "$name"; else printf '  %s\n' "$name"; fi
    done
}

# switch NAME: point `current` at releases/NAME atomically (a new symlink renamed over the old
# one: a restart at any moment finds one or the other). Prints "switched" or "unchanged".
cmd_switch() {
    local name=${1:-}
    exists "$name" || die "no release '$name' in $releases_dir (releases.sh list)"
    if [ "$(serving)" == "$name" ]; then
        echo "unchanged: $name"
        return 0
    fi
    ln -sfn "releases/$name" "$current.new"
    mv -T "$current.new" "$current"
    echo "switched: $name"
}

previous() { # the newest release built before the serving one
    local now name before=""
    now=$(serving)
    while read -r name; do
        [ "$name" == "$now" ] && break
        before=$name
    done < <(releases)
    printf '%s\n' "$before"
}

# target [RELEASE]: the release a rollback goes to, RELEASE or else the newest built before the
# serving one; fails when there is none (ansible/operate.yml asks every API host first).
cmd_target() {
    local name=${1:-}
    if [ -z "$name" ]; then
        name=$(previous)
        [ -n "$name" ] || die "no release older than the serving one ($(serving)); name one: releases.sh rollback RELEASE"
    fi
    exists "$name" || die "no release '$name' in $releases_dir (releases.sh list)"
    printf '%s\n' "$name"
}

cmd_rollback() {
    local name url deadline body
    name=$(cmd_target "${1:-}") || exit 1
    cmd_switch "$name"
    "$systemctl_cmd" restart "$SMALLY_SERVICE"
    url=$(health_url)
    deadline=$((SECONDS + ${SMALLY_ROLLBACK_WAIT:-180}))
    while [ "$SECONDS" -lt "$deadline" ]; do
        body=$(curl -sS --max-time 10 "$url" 2>/dev/null || true)
        if [[ "$body" == *'"status":"healthy"'* ]] && [[ "$body" == *"\"release\":\"$name\""* ]]; then
            echo "rollback: serving $name"
            return 0
        fi
        sleep 2
    done
    die "$SMALLY_SERVICE is not healthy on $name at $url after the restart: journalctl -u $SMALLY_SERVICE"
}

# prune KEEP: remove all but the KEEP newest releases, never the serving one; prints each removed.
cmd_prune() {
    local keep=${1:-} now name
    [[ "$keep" =~ ^[1-9][0-9]*$ ]] || die "prune needs how many releases to keep (1 or more)"
    now=$(serving)
    releases | head -n "-$keep" | while read -r name; do
        [ "$name" == "$now" ] && continue
        rm -rf -- "${releases_dir:?}/$name"
        echo "removed: $name"
    done
}

case "${1:-}" in
list) cmd_list ;;
switch) cmd_switch "${2:-}" ;;
rollback) cmd_rollback "${2:-}" ;;
target) cmd_target "${2:-}" ;;
prune) cmd_prune "${2:-}" ;;
*) usage ;;
esac
