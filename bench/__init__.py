"""FlowChat benchmarks: `python -m bench [--quick]`. Every number is printed next to a baseline measured in the same run."""
