#!/usr/bin/env bash
# What tests/test_asv_suite.py's dashboard test needs: Debian's chromium and its WebDriver, and npm
# (the dashboard's JavaScript libraries come from the npm registry, CI cannot reach their CDNs). Root.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-dejavu-core)  # a font, for legible screenshots
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
