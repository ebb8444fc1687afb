"""Side-by-side benchmarks of tolaria against the ways it replaces (see docs/architecture.md)."""
