#!/usr/bin/env bash
# Installs Debian's LibreOffice Impress (headless) and poppler's pdftoppm (as root): `mame-fast slides` renders its
# .pptx to PDF with it, and the slides' rendering test (`pytest -m office`) turns the PDF's pages into PNGs to measure
# them; Liberation Sans and Mono render the deck's Arial and Courier New with the same metrics. Idempotent: what is
# installed is left as it is. CI runs it before the suite (.ci/run).
set -euo pipefail
# No `grep -q` or `head` in a pipe: under pipefail, the writer killed by SIGPIPE when they stop reading fails the script.
if ! command -v soffice >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1 || ! fc-list | grep "Liberation Sans" >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libreoffice-impress poppler-utils fonts-dejavu-core fonts-liberation >/dev/null
fi
soffice --version
pdftoppm -v 2>&1 | sed -n 1p
