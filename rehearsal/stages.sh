# Sourced by rehearsal/rehearse.sh and rehearse-cluster.sh: their log, and their stages timed.
# The sourcing script sets LOG_NAME (the log lines' prefix) and RUN (where times.txt goes).

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
