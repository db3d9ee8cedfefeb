"""Schedulers, routers and speculation policies (filled in by the engine and policy issues)."""
