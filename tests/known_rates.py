"""Device rates for tests of the cost model, shared by the test files that plan."""

KNOWN_RATES = {
    "flops_per_s": 1e9,
    "memory_bytes_per_s": 1e9,
    "write_bytes_per_s": 1e8,
    "read_bytes_per_s": 1e8,
}
"""Given as options, so the cost model's decisions do not depend on this machine."""
