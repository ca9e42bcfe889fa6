"""The HTTP service: the app's assembly, its handlers, auth, errors, OpenAPI and the dashboard."""
