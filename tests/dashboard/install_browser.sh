#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the dashboard's browser tests (tests/dashboard), from
# apt, only when missing. Selenium is pointed at /usr/bin/chromedriver: no tool downloads a browser.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium chromium-driver
/usr/bin/chromium --version
