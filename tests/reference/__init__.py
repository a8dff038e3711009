"""Tests against independent references: expected values computed in the test from ALGORITHMS.md."""
