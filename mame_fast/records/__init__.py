"""Stage 5: what a run leaves behind (its folder, run.json, metrics, histograms, plots, the live display) and
what is read from it (diagnosis, cards, the report, the data report)."""
