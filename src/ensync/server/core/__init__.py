"""Transport-neutral engine core: apps, sessions, delivery, leases."""

__all__: list[str] = []
