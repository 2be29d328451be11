"""Shared test helpers: synthetic inputs, a headless browser, MLflow stores and servers."""
