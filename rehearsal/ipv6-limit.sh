#!/usr/bin/env bash
# Run on the rehearsal VM as root (rehearse.sh pipes it to `sudo bash -s`): nginx's limits count
# an IPv6 /64 as one client. Three addresses on lo, two in one /64 and one in another; while the
# first floods /v1/ (HTTP/2, 40 requests at once, again and again), the second, in the same /64,
# is refused too (429) and the third, in another /64, is not (401: no key). Prints one line;
# exit 1 when the limit does not hold.
set -euo pipefail
FLOODER=fd00:5e:1::a
NEIGHBOUR=fd00:5e:1::b
OTHER=fd00:5e:2::a
for address in $FLOODER $NEIGHBOUR $OTHER; do
    ip -6 addr replace "$address/128" dev lo
done
trap 'for address in $FLOODER $NEIGHBOUR $OTHER; do ip -6 addr del "$address/128" dev lo; done' EXIT
sleep 2 # duplicate address detection: an address is usable once it is no longer tentative
url() { echo "https://[$1]/v1/embed"; }
statuses() { # statuses SOURCE COUNT: the status of COUNT POSTs, one after another, from SOURCE
    for _ in $(seq "$2"); do
        curl -sk -o /dev/null -w '%{http_code}\n' --max-time 20 --interface "$1" -X POST -d '{}' "$(url "$1")"
    done
}
flood=()
for _ in $(seq 40); do flood+=("$(url $FLOODER)"); done
until=$((SECONDS + 10))
for _ in 1 2; do # two at once: one's gap between rounds is the other's round
    (while [ $SECONDS -lt $until ]; do
        curl -sk -Z --parallel-max 40 --max-time 20 --interface $FLOODER -X POST -d '{}' "${flood[@]}" >/dev/null 2>&1 || true
    done) &
done
sleep 3
# The neighbour's requests find the shared limit used up, but for the odd one that lands as the
# limit frees a slot (10 a second) before the flood takes it: half at least (9 of 10 on a quick
# machine). Without the /64 as one client, none would be refused. The other /64 has its own
# limit: all get through.
neighbour=$(statuses $NEIGHBOUR 10 | grep -c '^429$' || true)
other=$(statuses $OTHER 10 | grep -c '^401$' || true)
wait
echo "IPv6 /64 limit: while $FLOODER floods, $NEIGHBOUR (same /64) 429 x$neighbour of 10, $OTHER (another /64) 401 x$other of 10"
[ "$neighbour" -ge 5 ] && [ "$other" == 10 ]
