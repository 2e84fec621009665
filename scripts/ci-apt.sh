#!/usr/bin/env bash
# Install the Debian packages that CI's tests need (promtool for the Prometheus config and rules
# tests, ...). Keep the list here; .ci/run calls this before scripts/setup.sh.
# Fast when everything is installed already: no apt-get update, no network.
# Not root (a developer's own machine): prints what to install and leaves it to the person;
# the tests that need a missing tool skip with a reason.
set -euo pipefail

PACKAGES=(
  prometheus         # promtool and the Prometheus server (tests/test_metrics.py, tests/deploy)
  chromium           # headless browser: loads /dashboard (tests/api/test_dashboard.py)
  fonts-dejavu-core  # a font for the dashboard's text in headless Chromium
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  # dpkg -s succeeds for removed-but-configured packages too; require the installed state.
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "[ci-apt] all installed: ${PACKAGES[*]}"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[ci-apt] no apt-get (not Debian): skipping. Install the equivalents of: ${missing[*]}"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "[ci-apt] not root: skipping. Missing Debian packages: ${missing[*]}"
  echo "[ci-apt] install them with: sudo apt-get install -y --no-install-recommends ${missing[*]}"
  echo "[ci-apt] (tests that need them skip until then)"
  exit 0
fi

echo "[ci-apt] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[ci-apt] done"
