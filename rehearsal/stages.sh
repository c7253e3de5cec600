# Sourced by rehearsal/rehearse.sh and rehearse-cluster.sh: their log, their stages timed, and
# their load. The sourcing script sets LOG_NAME (the log lines' prefix), RUN (where times.txt
# and the loads' output go), LOAD_RATE, and defines `check` (check_http.py with its addresses).

log() { printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$LOG_NAME" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

STAGE_NAMES=() STAGE_TIMES=() CURRENT="" CURRENT_START=0 STARTED=$SECONDS
begin() {
    CURRENT=$1
    CURRENT_START=$SECONDS
    log "=== $1: $2"
}
end() {
    STAGE_NAMES+=("$CURRENT")
    STAGE_TIMES+=("$((SECONDS - CURRENT_START))")
    log "=== $CURRENT done in $((SECONDS - CURRENT_START)) s"
    CURRENT=""
}
# print_times RESULT: the table of stage times (also after a failure: the stage it failed in).
print_times() {
    local i
    {
        echo
        echo "$LOG_NAME stage times (seconds):"
        for i in "${!STAGE_NAMES[@]}"; do
            printf '  %-10s %5d\n' "${STAGE_NAMES[$i]}" "${STAGE_TIMES[$i]}"
        done
        [ -z "$CURRENT" ] || printf '  %-10s %5d  <- FAILED here\n' "$CURRENT" "$((SECONDS - CURRENT_START))"
        printf '  %-10s %5d\n' total "$((SECONDS - STARTED))"
        echo "result: $1 (logs in $RUN)"
    } | tee -a "$RUN/times.txt" >&2
}

# install_tools COMMAND:PACKAGE...: apt-get install the package of each command this host lacks.
install_tools() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    command -v apt-get >/dev/null || die "please install ${missing[*]}"
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# under_load NAME COMMAND...: run COMMAND (its output in $RUN/NAME.out) while check_http.py load
# POSTs /v1/embed through nginx with LOAD_KEY (4 clients, LOAD_RATE requests/s in all; `check`
# is the sourcing script's), from 5 s before to 5 s after; sets LOAD (the load's summary line),
# adds its 200s to LOAD_200S, and fails the rehearsal if COMMAND or a request fails.
# LOAD_RELEASE_ARGS (the sourcing script's, may stay empty): --release-command arguments, which
# let the load name the releases that served (through nginx /health names none).
LOAD="" LOAD_STOP="" LOAD_200S=0 LOAD_RELEASE_ARGS=()
under_load() {
    local name=$1 stop="$RUN/$1.load-stop" out="$RUN/$1.load" pid status=0 requests failed
    shift
    rm -f "$stop"
    LOAD_STOP=$stop
    check load --key "$LOAD_KEY" --workers 4 --rate "$LOAD_RATE" --stop-file "$stop" "${LOAD_RELEASE_ARGS[@]}" >"$out" 2>&1 &
    pid=$!
    sleep 5
    "$@" >"$RUN/$name.out" 2>&1 || status=$?
    sleep 5
    touch "$stop"
    wait "$pid" || true
    LOAD=$(tail -n 1 "$out" | sed 's/^\(ok\|FAIL\) *//')
    if [ "$status" != 0 ]; then
        tail -n 40 "$RUN/$name.out" >&2
        die "$name: the command failed (exit $status; $RUN/$name.out); load: $LOAD"
    fi
    # Every answer but a 200 counts as failed: the 200s are the requests less the failures.
    read -r requests failed < <(sed -n 's/^\([0-9]*\) requests, \([0-9]*\) failed.*/\1 \2/p' <<<"$LOAD")
    LOAD_200S=$((LOAD_200S + requests - failed))
    grep -q '^ok ' "$out" || { cat "$out" >&2; die "$name under load: $LOAD"; }
}
