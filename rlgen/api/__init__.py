"""rlgen as a library: the flows the `rlgen` commands run, callable from Python."""
