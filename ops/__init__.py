"""Operations: the `conclave` command line, configuration, serving and benchmarks."""
