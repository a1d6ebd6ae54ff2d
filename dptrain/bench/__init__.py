"""Speed and memory benchmarks: on CPU, on N processes, and on a lent GPU."""
