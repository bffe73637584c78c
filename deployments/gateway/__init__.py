"""The OpenAI-compatible ingress deployment."""
