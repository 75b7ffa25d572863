"""The configs shipped with pacofr (`pacofr.configs`, the repository's configs/ mapped by setup.py):
every key of each preset as YAML, the `make demo` run, and DeepSpeed ZeRO configs. pacofr.config
finds them by name."""
