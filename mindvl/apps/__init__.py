"""The applications over the library: the `mindvl` command line and its demo."""
