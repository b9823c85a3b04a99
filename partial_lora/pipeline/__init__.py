"""A run from its composed config to `results.json`: which stages it runs (`plan`), the one way in
(`runner.run_pipeline`: validate once, check the run dir once, run the stages), another run's probe
and allocation reused (`reuse`), and the run's results (`results`)."""
