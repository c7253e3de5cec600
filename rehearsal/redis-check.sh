#!/usr/bin/env bash
# Run on the rehearsal VM as root (rehearse.sh pipes it to `sudo bash -s`): one line per Redis
# server of the .env with its eviction policy, snapshot setting, key count and what a client
# without the password gets. The password goes through REDISCLI_AUTH (scripts/common.sh).
set -euo pipefail
. /home/smally/smally-api/scripts/common.sh
for name in REDIS_URL CACHE_REDIS_URL; do
    redis_cli_url "$(env_value "$name")"
    cli=(redis-cli --raw -u "$redis_url")
    policy=$("${cli[@]}" config get maxmemory-policy | tail -n 1)
    save=$("${cli[@]}" config get save | tail -n 1)
    keys=$("${cli[@]}" dbsize)
    unset REDISCLI_AUTH
    anonymous=$("${cli[@]}" ping 2>&1 | head -n 1 | cut -d ' ' -f 1)
    echo "$name policy=$policy save=[$save] keys=$keys anonymous=$anonymous"
done
