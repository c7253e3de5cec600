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
[ -x "$SMALLY_APP_DIR/current/create_api_key" ] || die "no $SMALLY_APP_DIR/current/create_api_key (deploy first)"
# create_api_key (the serving release's) reads .env from its working directory.
cd "$SMALLY_APP_DIR"
if [ "$(id -un)" == "$SMALLY_USER" ]; then
    exec ./current/create_api_key "$@"
fi
[ "$(id -u)" == 0 ] || die "run as root or $SMALLY_USER (the .env is readable by $SMALLY_USER only)"
exec runuser -u "$SMALLY_USER" -- ./current/create_api_key "$@"
