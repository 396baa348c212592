"""Fixtures built by our code for tests, benches and the README shots: models and data from installed packages, a
browser; the product never imports them."""
