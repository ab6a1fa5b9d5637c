"""A CS-Cart 4.x store emulator: a real HTTP server speaking the store's REST API.

It reproduces what /work/shared/cscart-api.md describes, quirks included, for every endpoint
the bridge uses, so the client, the consumers, the benchmarks and the demo can run against
something that fails the way a real store fails.

Usage::

    with StoreEmulator(api_user="admin@example.com", api_key="k") as emu:
        emu.add_product("Test001", amount=5)
        oid = emu.add_order(products=[{"product_code": "Test001", "amount": 2}])
        requests.get(f"{emu.url}/api/orders/{oid}", auth=("admin@example.com", "k"))

Inspection:

- ``emu.orders[order_id]`` is a :class:`StoredOrder` (slotted). Read fields as attributes
  (``.status``) or by key (``["status"]``); ``emu.get_order_json(id)`` is the served JSON.
- ``emu.shipments`` / ``emu.shipments_for(order_id)``: dicts exactly as served.
- ``emu.products[product_id]`` / ``emu.product_by_code(code)``: the stored dict; ``amount`` is
  an ``int`` there (the API serves it as a string).
- ``emu.requests`` (every request, faulted ones included), ``emu.count()``, ``emu.clear_log()``.
- ``emu.notifications``: ``(order_id, status, notify_user)`` per status change made through the
  API (``PUT /orders`` or ``order_status`` on a shipment); ``emu.status_changes`` has every
  change with all three flags and its source; ``emu.ignored_fields`` the keys a PUT ignored;
  ``emu.back_in_stock`` product ids whose stock went from <= 0 to > 0 through the API;
  ``emu.errors`` tracebacks of emulator bugs (a test should expect it empty).

Choices where the reference leaves one (each also noted where it is made):

- Unknown order on ``POST /shipments`` → 400 (CS-Cart creates nothing and answers 400).
- Routing (404) is decided before authentication; 405 after it.
- ``shipped_amount`` is the number ``0`` when nothing shipped and a string (``"2"``) once
  something did, ``shipment_amount`` a number: that is what PHP produces (DB string vs
  arithmetic). Parse both tolerantly.
- Status changes move stock when the inventory flags differ (``move_stock=True``), for products
  tracked by product (``B``) or by combination (``O``); seeding an order takes no stock.
  ``allow_negative_stock=False`` makes a short order go to ``B`` instead.
- Products are sorted by name, then product_id (the store's default "A to Z"); shipments newest
  first; statuses in insertion order and filtered to ``type`` ``O`` unless ``type`` is given.
- ``GET /combinations`` answers a bare JSON list (as documented), paged only when
  ``items_per_page`` is given; ``product_id`` is required there (400 otherwise).
- Faults: the endpoint's own fault wins over ``"*"``; within one, the order is rate limit,
  unauthorized, HTML page, error, timeout (latency always applies first). A hung write with
  ``timeout_applies=False`` is not applied and ends in 504 (a proxy gave up).
  502/503/504 errors carry an HTML body (proxies write those), other statuses JSON.
- ``carrier_info`` is given only for the carrier codes CS-Cart knows, matched exactly.
- Extra endpoints beyond the brief: ``statuses.get``, ``users.list``, ``combinations.get``.

Layout: ``coercion`` (PHP's reading of values), ``model`` (the records and the rules that
change them), ``views`` (the JSON served), ``http`` (server, routing, auth, faults),
``resources`` (one module per endpoint group), ``emulator`` (the store on the wire), ``seed``
(the demo store).
"""

from .emulator import StoreEmulator
from .http import ENDPOINTS, Fault, RecordedRequest
from .model import StoredOrder
from .seed import seed_demo_store
from .views import CARRIERS

__all__ = [
    "CARRIERS",
    "ENDPOINTS",
    "Fault",
    "RecordedRequest",
    "StoreEmulator",
    "StoredOrder",
    "seed_demo_store",
]
