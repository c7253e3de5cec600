#!/usr/bin/env bash
# Create an API key on the server with the server's .env, as the smally user:
#
#   sudo /home/smally/smally-api/scripts/create-api-key.sh EMAIL [TIER] [--name LABEL]
#
# (`make create-key EMAIL=... TIER=...` runs it over ssh). The key is printed alone on stdout.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ $# -ge 1 ] || die "usage: create-api-key.sh EMAIL [TIER] [--name LABEL]"
exec_release create_api_key "$@"
