"""``/users``: the store's users, never with their API keys."""

from __future__ import annotations

from ..coercion import php_str, php_truthy
from ..model import Store
from ..views import user_json
from .common import Call, Handler, Reply, found, listing


def list_users(store: Store, call: Call) -> Reply:
    params = call.params
    rows = sorted(store.users.values(), key=lambda u: u["user_id"])
    if php_truthy(params.get("user_type")):
        rows = [u for u in rows if u["user_type"] == php_str(params["user_type"])]
    return listing("users", rows, params, user_json)


def get_user(store: Store, call: Call) -> Reply:
    return found(store.users.get(call.number), user_json)


HANDLERS: dict[str, Handler] = {
    "users.list": list_users,
    "users.get": get_user,
}
