"""The application: the command line (:mod:`.cli`), sweeps, reports, comparisons and export. The only
layer that parses argv, draws progress bars and prints; the library below returns results as data."""
