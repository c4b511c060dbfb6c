"""Property-based tests of the finder and the rewriter on generated attention spellings."""
