#!/usr/bin/env bash
# What the browser tests (pytest -m browser: the asv dashboard drawn offline) need: Debian's chromium
# and its WebDriver. Root. The dashboard's JavaScript libraries come from the npm registry through
# tools/asv_dashboard.py itself: no npm needed.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)  # a font, for legible screenshots
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
