"""The kernel of slm-cluster: config, types, wire schema, seams, errors and pure decisions.

Nothing here imports Ray, torch, an engine library, kubernetes or FastAPI at module level.
"""
