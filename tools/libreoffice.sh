#!/usr/bin/env bash
# Installs Debian's LibreOffice Impress (headless) and poppler's pdftoppm (as root): `mame-fast slides` renders its
# .pptx to PDF with it, and the slides' rendering test (`pytest -m office`) turns the PDF's pages into PNGs to measure
# them; Liberation Sans and Mono render the deck's Arial and Courier New with the same metrics. Idempotent: what is
# installed is left as it is. CI runs it before the suite (.ci/run).
set -euo pipefail
if ! command -v soffice >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1 || ! fc-list | grep -q "Liberation Sans"; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libreoffice-impress poppler-utils fonts-dejavu-core fonts-liberation >/dev/null
fi
soffice --version
pdftoppm -v 2>&1 | head -1
