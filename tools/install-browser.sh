#!/usr/bin/env bash
# Install Chromium and its WebDriver (Debian/Ubuntu packages) for tests/test_studio_browser.py.
#
# Best effort, bounded in time: it never fails the caller. Without root or apt-get, or when the
# package servers cannot be reached within the time limit, it prints why and exits 0; the browser
# test is then skipped with its reason. Usage: tools/install-browser.sh [SECONDS] (default 240).
set -u
limit="${1:-240}"
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && { have chromedriver || [ -x /usr/lib/chromium/chromedriver ]; }; then
    echo "install-browser: chromium and chromedriver are already installed"
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: no apt-get here; the browser test will be skipped"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-browser: not root; the browser test will be skipped"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
if ! timeout "$limit" apt-get update -qq >/dev/null 2>&1; then
    echo "install-browser: apt-get update failed or took over ${limit}s; the browser test will be skipped"
    exit 0
fi
left=$(( limit - ($(date +%s) - start) ))
if [ "$left" -lt 10 ] || ! timeout "$left" apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
    echo "install-browser: installing chromium chromium-driver failed or ran out of time; the browser test will be skipped"
    exit 0
fi
echo "install-browser: installed $(chromium --version 2>/dev/null)"
exit 0
