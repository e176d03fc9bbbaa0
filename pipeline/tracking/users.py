"""The team server's users, through MLflow's basic-auth app (its admin API; the caller signs in as an admin through
`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`).

Two roles, created on first use in MLflow's default workspace: `writer` edits every experiment and registered model
(runs sweeps and searches into the team's experiments), `reader` reads them. Every signed-in user reads everything
anyway (the server's `default_permission`); without a role a user writes only into experiments they created."""

from __future__ import annotations

ROLES = {
    "writer": {"experiment": "EDIT", "registered_model": "EDIT"},
    "reader": {"experiment": "READ", "registered_model": "READ"},
}
WORKSPACE = "default"


def _client(uri: str):
    from mlflow.server import get_app_client

    return get_app_client("basic-auth", tracking_uri=uri)


def ensure_roles(uri: str) -> dict[str, int]:
    """The ids of the `writer` and `reader` roles, creating them (with their grants on every resource) if missing."""
    client = _client(uri)
    present = {role.name: role.id for role in client.list_roles(WORKSPACE)}
    for name, grants in ROLES.items():
        if name in present:
            continue
        role = client.create_role(WORKSPACE, name, description=f"compress-pipeline team {name}")
        for resource, permission in grants.items():
            client.add_role_permission(role.id, resource, "*", permission)
        present[name] = role.id
    return present


def add_user(uri: str, username: str, password: str, role: str) -> None:
    """Create `username` (or keep them, setting the new password) with `role`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, not {role!r}")
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    role_ids = ensure_roles(uri)
    try:
        client.create_user(username, password)
    except MlflowException as err:
        if "already exists" not in str(err).lower():
            raise
        client.update_user_password(username, password)
    held = {r.name for r in client.list_user_roles(username)}
    for other in set(ROLES) - {role}:
        if other in held:
            client.unassign_role(username, role_ids[other])
    if role not in held:
        client.assign_role(username, role_ids[role])
