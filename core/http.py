"""Small helpers over BlackSheep's request."""

from __future__ import annotations

from blacksheep import Request


def route_value(request: Request, name: str) -> str:
    """A path parameter of the matched route (`/admin/tenants/:tenant_id`): always there, since
    the router matched the pattern that names it."""
    value = request.route_values.get(name)
    if value is None:
        raise KeyError(name)  # a handler asked for a name its route does not have: a bug
    return value
