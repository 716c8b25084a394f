"""Speed and quality benchmarks; results and the commands that produced them in RESULTS.md."""
