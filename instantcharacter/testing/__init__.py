"""Tiny random twins of every model in its real on-disk layout (and full-width skeletons for ComfyUI's loaders), for
the tests, the selftest and the benchmarks."""
