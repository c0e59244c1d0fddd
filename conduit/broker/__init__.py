"""The broker (task service): a sans-IO matching core and the thin ZeroMQ/PostgreSQL shell around it."""
