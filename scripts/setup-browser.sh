#!/usr/bin/env bash
# Installs what the web-ui browser test (tests/e2e/web_ui.rs) drives: Debian's Chromium (apt, as
# root or through sudo) and playwright-core from the npm registry into .local/playwright/ (no
# browser download: the test points it at /usr/bin/chromium). Re-running is a no-op once both
# are there. Node.js and npm must be installed (Debian: apt-get install nodejs npm).
#
#   scripts/setup-browser.sh
#
# Environment: PLAYWRIGHT_VERSION (default 1.65.2).
set -euo pipefail

version="${PLAYWRIGHT_VERSION:-1.65.2}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="$root/.local/playwright"

if [ ! -x /usr/bin/chromium ]; then
    echo "installing Debian's chromium (apt-get)"
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get install -y --no-install-recommends chromium || {
        $sudo apt-get update && $sudo apt-get install -y --no-install-recommends chromium
    }
fi

stamp="$target/.installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "playwright-core@$version" ]; then
    echo "playwright-core $version already installed in $target"
    exit 0
fi
if ! command -v npm >/dev/null; then
    echo "error: npm not found; install Node.js and npm (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
mkdir -p "$target"
echo "installing playwright-core@$version into $target"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --silent --no-save --no-package-lock \
    --prefix "$target" "playwright-core@$version"
echo "playwright-core@$version" > "$stamp"
