"""The HTTP API (FastAPI). Never imports the runtime: workers are injected by the CLI."""
