#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium (as root) for the report's browser tests (`pytest -m browser`), and says
# where it is. Idempotent: an installed chromium is left as it is. CI runs it before the suite (.ci/run).
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version
