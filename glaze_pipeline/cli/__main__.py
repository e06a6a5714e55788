"""`python -m glaze_pipeline.cli`: the `glaze` command (the benchmark starts the mock this way)."""

from glaze_pipeline.cli import main

main()
