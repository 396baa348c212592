"""Fixtures built by our code for tests, benches and the README shots: models, data, a browser; the product never imports them."""
