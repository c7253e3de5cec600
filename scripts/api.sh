#!/usr/bin/env bash
# Run the service's own `api` command on the server, with the server's .env, as the smally user:
#
#   sudo /home/smally/smally-api/scripts/api.sh keys list alice@example.com
#   sudo /home/smally/smally-api/scripts/api.sh keys revoke sk_1a2b3c4d
#   sudo /home/smally/smally-api/scripts/api.sh usage alice@example.com --month 2026-11
#   sudo /home/smally/smally-api/scripts/api.sh migrate --status
#
# (`make api ARGS='...'` runs it over ssh). `api serve` is systemd's job: refused here.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ $# -ge 1 ] || die "usage: api.sh COMMAND [ARGS...] (keys, usage, migrate, --version)"
case "$1" in
serve) die "the service runs under systemd: sudo systemctl restart $SMALLY_SERVICE" ;;
esac
exec_release api "$@"
