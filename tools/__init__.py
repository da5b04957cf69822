"""Developer tools over the test rig: the offline demo and the benchmarks."""
