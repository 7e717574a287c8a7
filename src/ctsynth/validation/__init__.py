"""Great Expectations data checks and the leakage / near-duplicate detector."""
