"""The data plane: engine adapters, ModelServer, Router and Gateway deployments, build_app."""
