#!/usr/bin/env bash
# `make docs-assets`: Swagger UI's static files for GET /docs, from the npm registry at build
# time, into app/docs_assets/ (git-ignored), where the service serves them from a checkout and
# the PyInstaller spec bundles them into `api`. Nothing is fetched at run time: the page works
# with no internet.
#
# npm ci installs exactly build/docs-assets/package-lock.json (pinned versions and integrity
# hashes) with install scripts off: swagger-ui-dist pulls in @scarf/scarf, whose postinstall
# would report the install to an analytics service. Only the files the page loads (and the
# licences) are copied. The Makefile runs this when the lock file or this script is newer than
# the output; the output appears whole or not at all (built aside, then renamed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/app/docs_assets}
DIST=$HERE/node_modules/swagger-ui-dist

say() { echo "docs-assets: $*" >&2; }

if ! command -v npm >/dev/null; then
    if [ "$(id -u)" == 0 ] && command -v apt-get >/dev/null; then
        say "npm is missing: installing Debian's npm"
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq npm >/dev/null
    else
        say "needs Node.js and npm (apt-get install npm)"
        exit 2
    fi
fi

started=$(date +%s)
(cd "$HERE" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)

partial="$OUT.partial"
rm -rf "$partial"
mkdir -p "$partial"
cp "$DIST/swagger-ui-bundle.js" "$DIST/favicon-32x32.png" "$partial/"
# The stylesheet's last line names a source map nobody ships: a browser's developer tools
# would ask for it and get a 404.
grep -v '^/\*# sourceMappingURL=' "$DIST/swagger-ui.css" >"$partial/swagger-ui.css"
# Licences travel with the code (the bundle's own lists what it bundles).
cp "$DIST/LICENSE" "$partial/LICENSE.txt"
cp "$DIST/NOTICE" "$partial/NOTICE.txt"
cp "$DIST/swagger-ui-bundle.js.LICENSE.txt" "$partial/"
version=$(cd "$HERE" && node -p 'require("swagger-ui-dist/package.json").version')
lock_sha=$(sha256sum "$HERE/package-lock.json" | cut -c1-64)
printf '{"swagger-ui-dist": "%s", "package-lock.json sha256": "%s"}\n' "$version" "$lock_sha" \
    >"$partial/manifest.json"

rm -rf "$OUT"
mv "$partial" "$OUT"
say "swagger-ui-dist $version into ${OUT#"$REPO"/} ($(du -sk "$OUT" | cut -f1) KiB) in $(($(date +%s) - started)) s"
