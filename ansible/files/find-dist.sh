#!/bin/sh
# find-dist.sh DIST ARCH: print the directory under DIST holding api, create_api_key and
# models/all-MiniLM-L6-v2 built for ARCH (x86_64 or aarch64), or explain what to build and fail.
# Run on the machine that deploys (ansible/site.yml, step 5). `make build` puts this machine's
# build in DIST, `make build ARCH=arm64` an aarch64 one in DIST/arm64.
set -eu
dist=$1 arch=$2
case "$arch" in
x86_64 | amd64) want=3e arch=x86_64 candidates="$dist $dist/x86_64" build="make build (on an x86_64 machine)" ;;
aarch64 | arm64) want=b7 arch=aarch64 candidates="$dist/arm64 $dist" build="make build ARCH=arm64" ;;
*) echo "servers of architecture $arch are not supported (x86_64 or aarch64)" >&2; exit 1 ;;
esac
found=""
for dir in $candidates; do
    [ -f "$dir/api" ] || continue
    # ELF e_machine, the two bytes at offset 18: 0x3e x86-64, 0xb7 AArch64.
    machine=$(od -An -tx1 -j18 -N1 "$dir/api" | tr -d ' \n')
    [ "$machine" = "$want" ] || continue
    for part in create_api_key models/all-MiniLM-L6-v2/model.onnx models/all-MiniLM-L6-v2/tokenizer.json \
        models/all-MiniLM-L6-v2/manifest.json; do
        if [ ! -e "$dir/$part" ]; then
            echo "$dir/api is an $arch build but $dir/$part is missing: run $build" >&2
            exit 1
        fi
    done
    found=$dir
    break
done
if [ -z "$found" ]; then
    echo "the binaries were not built for this $arch server: no $arch api in $(echo "$candidates" | sed 's/ / or /'). Run $build first." >&2
    exit 1
fi
(cd "$found" && pwd)
