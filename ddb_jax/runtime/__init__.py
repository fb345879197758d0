"""Where a run runs: platforms, multi-host start-up, the processes of a stage."""
