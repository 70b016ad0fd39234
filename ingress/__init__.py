"""The OpenAI-compatible HTTP ingress (Starlette)."""
