"""Fixtures for tests, benchmarks and the demo: real models and data built from installed packages."""
