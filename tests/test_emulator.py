"""The CS-Cart store emulator, over real HTTP: the quirks the bridge must survive."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests

from cscart_emulator import ENDPOINTS, Fault, RecordedRequest, StoreEmulator, seed_demo_store
from cscart_emulator.resources import HANDLERS

USER = "admin@example.com"
KEY = "test-api-key"
AUTH = (USER, KEY)


@pytest.fixture
def emu() -> Iterator[StoreEmulator]:
    with StoreEmulator(api_user=USER, api_key=KEY, seed=1) as store:
        yield store
    assert store.errors == []  # no emulator bug hid behind a 500


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.auth = AUTH
        yield session


def api(emu: StoreEmulator, path: str) -> str:
    return f"{emu.url}/api/{path}"


def item_ids(emu: StoreEmulator, order_id: int) -> list[str]:
    return list(emu.get_order_json(order_id)["products"])


# ---- routing and authentication ---------------------------------------------------------------
def test_every_endpoint_has_a_handler() -> None:
    # routing admits ENDPOINTS, dispatch looks the handler up: a gap would answer 500
    assert set(HANDLERS) == ENDPOINTS


def test_auth_missing_or_wrong_is_401_with_realm(emu: StoreEmulator) -> None:
    for auth in (None, (USER, "wrong"), ("nobody@example.com", KEY)):
        r = requests.get(api(emu, "orders"), auth=auth, timeout=5)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="User email/API key"'
        assert r.json() == {"message": "Unauthorized", "status": 401}


def test_auth_email_is_case_insensitive(emu: StoreEmulator) -> None:
    r = requests.get(api(emu, "orders"), auth=(USER.upper(), KEY), timeout=5)
    assert r.status_code == 200


def test_customer_is_403_and_disabled_admin_is_401(emu: StoreEmulator) -> None:
    emu.add_user(7, "shopper@example.com", user_type="C", api_key="ck")
    emu.add_user(8, "gone@example.com", user_type="A", status="D", api_key="gk")
    r = requests.get(api(emu, "orders"), auth=("shopper@example.com", "ck"), timeout=5)
    assert r.status_code == 403
    assert r.json()["status"] == 403
    r = requests.get(api(emu, "orders"), auth=("gone@example.com", "gk"), timeout=5)
    assert r.status_code == 401


def test_user_never_shows_the_key(emu: StoreEmulator, http: requests.Session) -> None:
    body = http.get(api(emu, "users/1")).json()
    assert body["email"] == USER
    assert body["user_type"] == "A" and body["status"] == "A"
    assert body["user_id"] == "1" and body["company_id"] == "0"
    assert KEY not in json.dumps(body) and "api_key" not in body
    assert http.get(api(emu, "users/99")).status_code == 404


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/orders", 200),
        ("/api/2.0/orders", 200),
        ("/api/orders/", 200),
        ("/api.php?_d=orders", 200),
        ("/api/2/orders", 404),
        ("/api/widgets", 404),
        ("/api/orders/abc", 404),
        ("/api/orders/1/shipments", 404),
        ("/index.php", 404),
        ("/api/combinations?product_id=1", 404),  # gone since 4.10
    ],
)
def test_paths(emu: StoreEmulator, http: requests.Session, path: str, status: int) -> None:
    r = http.get(emu.url + path)
    assert r.status_code == status
    if status == 404:
        assert r.json() == {"message": "Not Found", "status": 404}


def test_api_php_with_id(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order()
    r = http.get(f"{emu.url}/api.php", params={"_d": f"orders/{oid}"})
    assert r.status_code == 200
    assert r.json()["order_id"] == str(oid)


def test_405_for_unsupported_methods(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order()
    assert http.delete(api(emu, f"orders/{oid}")).status_code == 405
    assert http.post(api(emu, "products"), json={}).status_code == 405
    assert http.put(api(emu, "orders"), json={}).status_code == 405
    r = http.patch(api(emu, f"orders/{oid}"), json={})
    assert r.status_code == 405
    assert r.json()["message"] == "Method Not Allowed"


# ---- encoding --------------------------------------------------------------------------------
def test_numbers_are_strings_and_json_is_phpish(emu: StoreEmulator, http: requests.Session) -> None:
    emu.add_product("Test001", 5, product="Test item 1")
    oid = emu.add_order(firstname="Zoë", products=[{"product_code": "Test001", "amount": 2}])
    r = http.get(api(emu, f"orders/{oid}"))
    assert r.headers["Content-Type"] == "application/json"
    assert "\\u00eb" in r.text  # non-ASCII escaped like json_encode
    order = r.json()
    for key in ("order_id", "user_id", "timestamp", "total", "company_id", "updated_at"):
        assert isinstance(order[key], str), key
    assert order["total"] == "20.00"
    assert order["subtotal"] == 20.0 and order["discount"] == 0  # numbers in details
    (line,) = order["products"].values()
    assert line["amount"] == "2" and line["price"] == "10.00" and line["product_id"] == "1"
    assert line["item_id"].isdigit() and line["extra"] == []
    assert line["shipped_amount"] == 0 and line["shipment_amount"] == 2
    assert order["shipping"] == [
        {"shipping_id": "1", "shipping": "Standard", "group_key": 0, "rate": 0, "delivery_time": ""}
    ]
    assert order["shipment_ids"] == [] and order["taxes"] == []
    assert order["secondary_currency"] == "AUD"
    assert order["s_country"] == "AU" and order["b_country"] == "AU"
    assert order["firstname"] == "Zoë"

    r = http.post(
        api(emu, "shipments"),
        json={"order_id": oid, "shipping_id": 1, "carrier": "aup", "tracking_number": "AB/1"},
    )
    r = http.get(api(emu, "shipments"), params={"order_id": oid})
    assert "AB\\/1" in r.text  # slashes escaped
    assert r.json()["params"]["total_items"] == "1"


def test_item_ids_are_stable(emu: StoreEmulator) -> None:
    oid = emu.add_order(
        products=[{"product_code": "A", "amount": 1}, {"product_code": "B", "amount": 1}]
    )
    first = item_ids(emu, oid)
    assert len(set(first)) == 2
    assert item_ids(emu, oid) == first


def test_empty_products_come_out_as_list(emu: StoreEmulator) -> None:
    oid = emu.add_order(products=[])
    assert emu.get_order_json(oid)["products"] == []


def test_stored_order_has_attribute_and_key_access(emu: StoreEmulator) -> None:
    oid = emu.add_order(status="O", phone="+61 400 000 000")
    assert emu.orders[oid].status == "O" and emu.orders[oid]["status"] == "O"
    assert emu.get_order_json(oid)["phone"] == "+61 400 000 000"


# ---- paging ----------------------------------------------------------------------------------
def test_orders_default_page_of_10_and_total(emu: StoreEmulator, http: requests.Session) -> None:
    emu.add_history(25, start_timestamp=1_700_000_000)
    body = http.get(api(emu, "orders")).json()
    assert len(body["orders"]) == 10
    assert body["params"]["total_items"] == "25"
    assert body["params"]["page"] == "1" and body["params"]["items_per_page"] == "10"
    assert [o["order_id"] for o in body["orders"]][:2] == ["25", "24"]  # newest first
    assert len(http.get(api(emu, "orders"), params={"page": 3}).json()["orders"]) == 5
    assert http.get(api(emu, "orders"), params={"page": 4}).json()["orders"] == []
    everything = http.get(api(emu, "orders"), params={"items_per_page": 0}).json()
    assert len(everything["orders"]) == 25
    assert "total_items" not in everything["params"]


def test_shipments_page_past_end_returns_last_page(
    emu: StoreEmulator, http: requests.Session
) -> None:
    oid = emu.add_order(products=[{"product_code": "A", "amount": 15}])
    (iid,) = item_ids(emu, oid)
    for n in range(12):
        r = http.post(
            api(emu, "shipments"),
            json={
                "order_id": oid,
                "shipping_id": 1,
                "tracking_number": f"T{n}",
                "products": {iid: 1},
            },
        )
        assert r.status_code == 201
    page2 = http.get(api(emu, "shipments"), params={"order_id": oid, "page": 2}).json()
    page9 = http.get(api(emu, "shipments"), params={"order_id": oid, "page": 9}).json()
    assert len(page2["shipments"]) == 2
    assert page9["shipments"] == page2["shipments"]  # not empty: stop by total_items
    assert page9["params"]["total_items"] == "12"


def test_products_and_statuses_page_past_end_is_empty(
    emu: StoreEmulator, http: requests.Session
) -> None:
    for n in range(3):
        emu.add_product(f"P{n}")
    assert http.get(api(emu, "products"), params={"page": 2}).json()["products"] == []
    body = http.get(api(emu, "statuses"), params={"page": 2}).json()
    assert body["statuses"] == [] and body["params"]["total_items"] == "8"


# ---- orders list filters -----------------------------------------------------------------------
def test_status_list_vs_comma(emu: StoreEmulator, http: requests.Session) -> None:
    emu.add_order(status="P")
    emu.add_order(status="C")
    emu.add_order(status="O")
    listed = http.get(api(emu, "orders"), params={"status[]": ["P", "C"]}).json()["orders"]
    assert sorted(o["status"] for o in listed) == ["C", "P"]
    one = http.get(api(emu, "orders"), params={"status": "P"}).json()["orders"]
    assert [o["status"] for o in one] == ["P"]
    comma = http.get(api(emu, "orders"), params={"status": "P,C"}).json()
    assert comma["orders"] == [] and comma["params"]["total_items"] == "0"


def test_parent_and_incomplete_orders_hidden(emu: StoreEmulator, http: requests.Session) -> None:
    parent = emu.add_order(is_parent_order="Y")
    child = emu.add_order(parent_order_id=parent, company_id=2)
    incomplete = emu.add_order(status="N")
    listed = {o["order_id"] for o in http.get(api(emu, "orders")).json()["orders"]}
    assert listed == {str(child)}
    with_n = http.get(api(emu, "orders"), params={"include_incompleted": 1}).json()["orders"]
    assert {o["order_id"] for o in with_n} == {str(child), str(incomplete)}
    assert http.get(api(emu, f"orders/{parent}")).status_code == 200  # detail still works
    item = http.get(api(emu, "orders")).json()["orders"][0]
    assert item["parent_order_id"] == str(parent) and item["company_id"] == "2"
    assert set(item) == {
        "order_id",
        "issuer_id",
        "user_id",
        "is_parent_order",
        "parent_order_id",
        "company_id",
        "company",
        "timestamp",
        "firstname",
        "lastname",
        "email",
        "phone",
        "status",
        "total",
    }


def test_other_filters(emu: StoreEmulator, http: requests.Session) -> None:
    a = emu.add_order(email="Alice@Example.com", user_id=5, company_id=1)
    b = emu.add_order(email="bob@example.com", user_id=6, company_id=2)
    c = emu.add_order(email="carol@example.com", user_id=5, company_id=2)

    def ids(**params: Any) -> set[int]:
        body = http.get(api(emu, "orders"), params=params).json()
        return {int(o["order_id"]) for o in body["orders"]}

    assert ids(order_id=f"{a},{c}") == {a, c}
    assert ids(company_id=2) == {b, c}
    assert ids(email="alice@") == {a}  # LIKE %email%
    assert ids(user_id=5) == {a, c}


def test_period_custom_unix_and_dates_in_store_timezone(http: requests.Session) -> None:
    sydney = ZoneInfo("Australia/Sydney")
    with StoreEmulator(api_user=USER, api_key=KEY, timezone="Australia/Sydney") as emu:
        inside = emu.add_order(timestamp=datetime(2024, 3, 5, 0, 30, tzinfo=sydney))
        late = emu.add_order(timestamp=datetime(2024, 3, 5, 23, 59, 30, tzinfo=sydney))
        before = emu.add_order(timestamp=datetime(2024, 3, 4, 23, 59, tzinfo=sydney))
        recent = emu.add_order()

        def ids(**params: Any) -> set[int]:
            body = http.get(api(emu, "orders"), params=params).json()
            return {int(o["order_id"]) for o in body["orders"]}

        assert ids(period="C", time_from="03/05/2024", time_to="03/05/2024") == {inside, late}
        start = int(datetime(2024, 3, 5, tzinfo=sydney).timestamp())
        assert ids(period="C", time_from=start, time_to=start + 3600) == {inside}
        # without period, time_from does nothing
        assert ids(time_from=start, time_to=start + 3600) == {inside, late, before, recent}
        # an ISO date silently becomes "now": from now to 2024 is an empty range
        assert ids(period="C", time_from="2024-03-05", time_to=start + 3600) == set()
        assert ids(period="D") == {recent}
        assert ids(period="A") == {inside, late, before, recent}


def test_sorting_and_ties(emu: StoreEmulator, http: requests.Session) -> None:
    same = 1_700_000_000
    first = emu.add_order(timestamp=same, lastname="Young")
    second = emu.add_order(timestamp=same, lastname="Adams")
    older = emu.add_order(timestamp=same - 10, lastname="Moss")

    def order(**params: Any) -> list[int]:
        body = http.get(api(emu, "orders"), params=params).json()
        return [int(o["order_id"]) for o in body["orders"]]

    assert order() == [second, first, older]  # date desc, ties by id desc
    assert order(sort_order="asc") == [older, first, second]
    assert order(sort_by="customer", sort_order="asc") == [second, older, first]
    assert order(sort_by="order_id", sort_order="asc") == [first, second, older]


# ---- get_orders_data and updated_at: version switches ---------------------------------------------
@pytest.mark.parametrize(("version", "full"), [((4, 18), True), ((4, 12), False)])
def test_get_orders_data_version_gate(
    http: requests.Session, version: tuple[int, int], full: bool
) -> None:
    with StoreEmulator(api_user=USER, api_key=KEY, version=version) as emu:
        oid = emu.add_order()
        (item,) = http.get(api(emu, "orders"), params={"get_orders_data": 1}).json()["orders"]
        assert ("products" in item) is full
        if full:
            assert item == emu.get_order_json(oid)


@pytest.mark.parametrize(("version", "honoured"), [((4, 13), True), ((4, 12), False)])
def test_updated_at_filter_version_gate(
    http: requests.Session, version: tuple[int, int], honoured: bool
) -> None:
    with StoreEmulator(api_user=USER, api_key=KEY, version=version) as emu:
        old = emu.add_order(timestamp=1_600_000_000)
        changed = emu.add_order(timestamp=1_600_000_000)
        emu.set_order_status(changed, "C")  # an admin change bumps updated_at to now
        assert emu.orders[changed].updated_at >= time.time() - 5
        body = http.get(
            api(emu, "orders"), params={"updated_at_from": int(time.time()) - 60}
        ).json()
        listed = {int(o["order_id"]) for o in body["orders"]}
        assert listed == ({changed} if honoured else {old, changed})


def test_changed_since_answers_every_changed_order_however_it_changed(
    emu: StoreEmulator, http: requests.Session
) -> None:
    """The emulator answers "changed since" from an index (as a store's database would):
    orders seeded in bulk, added one by one, changed in the admin and through the API all
    land in it at their latest change, and an unchanged old order never does."""
    now = int(time.time())
    history = emu.add_history(500, start_timestamp=now - 86_400, step_seconds=60, status="P")
    fresh = emu.add_order(status="P", timestamp=now - 30)
    emu.set_order_status(history[0], "C")  # an admin change
    assert http.put(api(emu, f"orders/{history[1]}"), json={"status": "C"}).status_code == 200
    emu.set_order_status(history[0], "P")  # changed twice: listed once

    def changed_since(moment: int) -> set[int]:
        body = http.get(api(emu, "orders"), params={
            "updated_at_from": moment, "items_per_page": 1000}).json()
        return {int(o["order_id"]) for o in body["orders"]}

    assert changed_since(now - 60) == {fresh, history[0], history[1]}
    assert changed_since(now - 86_400 + 60 * 498) == {
        history[498], history[499], fresh, history[0], history[1]}
    assert len(changed_since(1)) == 501


def test_status_names_by_version(http: requests.Session) -> None:
    for version, name in (((4, 13), "Paid"), ((4, 12), "Processed")):
        with StoreEmulator(api_user=USER, api_key=KEY, version=version) as emu:
            statuses = http.get(api(emu, "statuses")).json()["statuses"]
            names = {s["status"]: s["description"] for s in statuses}
            assert names["P"] == name
            assert names["I"] == "Canceled" and names["B"] == "Backordered"
            paid = next(s for s in statuses if s["status"] == "P")
            assert paid["params"]["inventory"] == "D" and paid["type"] == "O"
            assert paid["status_id"].isdigit()


# ---- PUT /orders ---------------------------------------------------------------------------------
def test_put_order_status_and_notify_flags(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order(status="P", timestamp=1_600_000_000)
    r = http.put(
        api(emu, f"orders/{oid}"), json={"status": "C", "notify_user": "N", "notify_department": 0}
    )
    assert r.status_code == 200 and r.json() == {"order_id": str(oid)}
    assert emu.orders[oid].status == "C"
    assert emu.orders[oid].updated_at > 1_600_000_000
    assert emu.notifications == [(oid, "C", True)]  # "N" is non-empty: the e-mail goes
    assert emu.status_changes[-1]["notify_department"] is False
    # the same status: 200, nothing happens
    assert http.put(api(emu, f"orders/{oid}"), json={"status": "C"}).status_code == 200
    assert len(emu.notifications) == 1
    # an unknown letter is written as sent
    http.put(api(emu, f"orders/{oid}"), json={"status": "Z", "notify_user": False})
    assert emu.orders[oid].status == "Z" and emu.notifications[-1] == (oid, "Z", False)
    # other keys are ignored (and recorded)
    http.put(api(emu, f"orders/{oid}"), json={"status": "C", "total": 1})
    assert emu.ignored_fields[-1] == ("orders.update", str(oid), ["total"])
    assert emu.orders[oid].total is None


def test_put_unknown_order_is_200(emu: StoreEmulator, http: requests.Session) -> None:
    r = http.put(api(emu, "orders/999"), json={"status": "C"})
    assert r.status_code == 200 and r.json() == {"order_id": "999"}
    assert 999 not in emu.orders


def test_json_without_content_type_changes_nothing(
    emu: StoreEmulator, http: requests.Session
) -> None:
    oid = emu.add_order(status="P")
    r = http.put(
        api(emu, f"orders/{oid}"),
        data=json.dumps({"status": "C"}),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 200  # "succeeds"...
    assert emu.orders[oid].status == "P"  # ...having changed nothing
    assert emu.requests[-1].json is None and emu.requests[-1].body
    # a PHP form is understood
    http.put(api(emu, f"orders/{oid}"), data={"status": "C", "notify_user": "0"})
    assert emu.orders[oid].status == "C" and emu.notifications[-1] == (oid, "C", False)


def test_status_change_moves_stock(http: requests.Session) -> None:
    with StoreEmulator(api_user=USER, api_key=KEY, allow_negative_stock=False) as emu:
        pid = emu.add_product("Test001", 5)
        oid = emu.add_order(status="P", products=[{"product_code": "Test001", "amount": 2}])
        http.put(api(emu, f"orders/{oid}"), json={"status": "I"})  # canceled: stock back
        assert emu.products[pid]["amount"] == 7
        emu.products[pid]["amount"] = 1
        http.put(api(emu, f"orders/{oid}"), json={"status": "P"})
        assert emu.orders[oid].status == "B"  # short stock, no negatives: backordered


# ---- shipments -----------------------------------------------------------------------------------
def test_shipment_create_cut_down_then_nothing_left(
    emu: StoreEmulator, http: requests.Session
) -> None:
    oid = emu.add_order(
        products=[{"product_code": "A", "amount": 3}, {"product_code": "B", "amount": 1}]
    )
    a, b = item_ids(emu, oid)
    r = http.post(
        api(emu, "shipments"),
        json={
            "order_id": oid,
            "shipping_id": 1,
            "tracking_number": "TN1",
            "carrier": "aup",
            "products": {a: 10, "123": 4},
            "comments": "first box",
        },
    )
    assert r.status_code == 201
    sid = r.json()["shipment_id"]
    assert isinstance(sid, int)  # a number on POST
    shipment = emu.shipments[sid]
    assert shipment["products"] == {a: "3"}  # cut down to what was left
    assert shipment["carrier_info"]["tracking_url"].endswith("/details/TN1")
    assert shipment["carrier_info"]["name"] == "Australia Post"
    line = emu.get_order_json(oid)["products"][a]
    assert line["shipped_amount"] == "3" and line["shipment_amount"] == 0
    assert emu.get_order_json(oid)["shipment_ids"] == [str(sid)]

    r = http.post(
        api(emu, "shipments"),
        json={"order_id": oid, "shipping_id": 1, "carrier": "ups", "products": {a: 1}},
    )
    assert r.status_code == 400  # nothing left of a
    # no products: everything not yet shipped (only b)
    r = http.post(
        api(emu, "shipments"), json={"order_id": oid, "shipping_id": 1, "tracking_number": "TN2"}
    )
    assert r.status_code == 201
    assert emu.shipments[r.json()["shipment_id"]]["products"] == {b: "1"}
    assert "carrier_info" not in emu.shipments[r.json()["shipment_id"]]
    r = http.post(
        api(emu, "shipments"), json={"order_id": oid, "shipping_id": 1, "tracking_number": "TN3"}
    )
    assert r.status_code == 400
    assert len(emu.shipments_for(oid)) == 2


def test_shipment_validation(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order()
    r = http.post(api(emu, "shipments"), json={"order_id": oid, "tracking_number": "T"})
    assert r.status_code == 400 and "shipping_id" in r.json()["message"]
    r = http.post(api(emu, "shipments"), json={"order_id": oid, "shipping_id": 1})
    assert r.status_code == 400 and "tracking_number" in r.json()["message"]
    r = http.post(
        api(emu, "shipments"), json={"order_id": 999, "shipping_id": 1, "tracking_number": "T"}
    )
    assert r.status_code == 400  # unknown order: 400 (the emulator's documented choice)
    assert emu.shipments == {}


def test_shipment_order_status_update_and_delete(
    emu: StoreEmulator, http: requests.Session
) -> None:
    oid = emu.add_order(status="P")
    r = http.post(
        api(emu, "shipments"),
        json={
            "order_id": oid,
            "shipping_id": 1,
            "tracking_number": "T1",
            "order_status": "C",
            "notify_user": 1,
        },
    )
    sid = r.json()["shipment_id"]
    assert emu.orders[oid].status == "C" and emu.notifications == [(oid, "C", True)]

    r = http.put(
        api(emu, f"shipments/{sid}"), json={"tracking_number": "T2", "order_id": 5, "status": "S"}
    )
    assert r.status_code == 200 and r.json() == {"shipment_id": str(sid)}
    got = http.get(api(emu, f"shipments/{sid}")).json()
    assert got["tracking_number"] == "T2" and got["status"] == "S"
    assert got["order_id"] == str(oid)  # not changeable

    r = http.delete(api(emu, f"shipments/{sid}"))
    assert r.status_code == 204 and r.content == b""
    assert http.get(api(emu, f"shipments/{sid}")).status_code == 404
    (line,) = emu.get_order_json(oid)["products"].values()
    assert line["shipped_amount"] == 0 and line["shipment_amount"] == 2  # given back
    assert http.delete(api(emu, f"shipments/{sid}")).status_code == 404


def test_shipment_form_body_with_nested_products(
    emu: StoreEmulator, http: requests.Session
) -> None:
    oid = emu.add_order(products=[{"product_code": "A", "amount": 4}])
    (iid,) = item_ids(emu, oid)
    r = http.post(
        api(emu, "shipments"),
        data={"order_id": oid, "shipping_id": 1, "carrier": "usps", f"products[{iid}]": 1},
    )
    assert r.status_code == 201
    assert emu.shipments[r.json()["shipment_id"]]["products"] == {iid: "1"}


# ---- products and combinations ---------------------------------------------------------------------
def test_products_pcode_substring_and_update(emu: StoreEmulator, http: requests.Session) -> None:
    a = emu.add_product("Test001", 3)
    emu.add_product("Test0011", 1)
    emu.add_product("Other", 1, tracking="D")
    found = http.get(api(emu, "products"), params={"pcode": "test001"}).json()["products"]
    assert {p["product_code"] for p in found} == {"Test001", "Test0011"}
    p = next(p for p in found if p["product_code"] == "Test001")
    assert p["amount"] == "3" and p["product_id"] == str(a) and p["tracking"] == "B"
    assert p["product_type"] == "P" and p["parent_product_id"] == "0"
    tracked = http.get(api(emu, "products"), params={"tracking[]": "D"}).json()["products"]
    assert [p["product_code"] for p in tracked] == ["Other"]

    r = http.put(api(emu, f"products/{a}"), json={"amount": -2})
    assert r.status_code == 200 and r.json() == {"product_id": str(a)}
    assert emu.product_by_code("Test001")["amount"] == -2  # type: ignore[index]
    http.put(api(emu, f"products/{a}"), json={"amount": 4})
    assert emu.back_in_stock == [a]
    assert http.put(api(emu, "products/999"), json={"amount": 1}).status_code == 404
    assert http.get(api(emu, f"products/{a}")).json()["amount"] == "4"
    with pytest.raises(ValueError, match="already exists"):
        emu.add_product("Test001")


def test_variations(emu: StoreEmulator, http: requests.Session) -> None:
    parent = emu.add_product("TEE", tracking="D")
    emu.add_product("TEE-M", 2, product_type="V", parent_product_id=parent)
    rows = http.get(api(emu, "products"), params={"parent_product_id": parent}).json()
    assert [(p["product_code"], p["product_type"]) for p in rows["products"]] == [("TEE-M", "V")]
    with pytest.raises(ValueError, match=r"before 4\.10"):
        emu.add_combination(parent, "TEE-S", 1)


def test_combinations_on_old_store(http: requests.Session) -> None:
    with StoreEmulator(api_user=USER, api_key=KEY, version=(4, 9)) as emu:
        pid = emu.add_product("TEE", tracking="O")
        combo = emu.add_combination(pid, "TEE-S", 4, {"1": "2"})
        rows = http.get(api(emu, "combinations"), params={"product_id": pid}).json()
        assert rows == [
            {
                "product_id": str(pid),
                "product_code": "TEE-S",
                "combination_hash": combo["combination_hash"],
                "combination": {"1": "2"},
                "amount": "4",
                "temp": "N",
                "position": "0",
            }
        ]
        r = http.put(api(emu, f"combinations/{combo['combination_hash']}"), json={"amount": 9})
        assert r.status_code == 200 and combo["amount"] == 9
        assert http.get(api(emu, "combinations")).status_code == 400  # product_id required
        assert "parent_product_id" not in http.get(api(emu, f"products/{pid}")).json()
        with pytest.raises(ValueError, match=r"from 4\.10"):
            emu.add_product("V1", product_type="V", parent_product_id=pid)


# ---- faults ----------------------------------------------------------------------------------------
def test_fault_latency(emu: StoreEmulator, http: requests.Session) -> None:
    emu.set_fault("orders.list", Fault(latency=0.3))
    started = time.monotonic()
    assert http.get(api(emu, "orders")).status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    http.get(api(emu, "statuses"))  # other endpoints untouched
    assert time.monotonic() - started < 0.3


def test_fault_error_rate_does_not_apply(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order(status="P")
    emu.set_fault("orders.update", Fault(error_rate=1.0, error_status=503))
    r = http.put(api(emu, f"orders/{oid}"), json={"status": "C"})
    assert r.status_code == 503 and "text/html" in r.headers["Content-Type"]
    assert emu.orders[oid].status == "P"
    emu.set_fault("orders.update", Fault(error_rate=1.0, error_status=500))
    r = http.put(api(emu, f"orders/{oid}"), json={"status": "C"})
    assert r.status_code == 500 and r.json()["status"] == 500
    rec = emu.requests[-1]
    assert isinstance(rec, RecordedRequest)
    assert (rec.endpoint, rec.status, rec.fault) == ("orders.update", 500, "error")


def test_fault_error_rate_is_a_seeded_share() -> None:
    def draws(seed: int) -> list[int]:
        with StoreEmulator(api_user=USER, api_key=KEY, seed=seed) as emu:
            emu.set_fault("*", Fault(error_rate=0.5))
            with requests.Session() as s:
                s.auth = AUTH
                return [s.get(api(emu, "statuses")).status_code for _ in range(40)]

    first = draws(3)
    assert first == draws(3)  # reproducible
    assert 5 < first.count(503) < 35


def test_fault_timeout_applies_the_write(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order()
    emu.set_fault("shipments.create", Fault(timeout_rate=1.0, hang_seconds=2.0))
    with pytest.raises(requests.Timeout):
        http.post(
            api(emu, "shipments"),
            json={"order_id": oid, "shipping_id": 1, "tracking_number": "T"},
            timeout=0.3,
        )
    assert len(emu.shipments_for(oid)) == 1  # outcome unknown to the client, but applied


def test_fault_timeout_not_applied_ends_504(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order()
    emu.set_fault(
        "shipments.create", Fault(timeout_rate=1.0, hang_seconds=0.2, timeout_applies=False)
    )
    r = http.post(
        api(emu, "shipments"), json={"order_id": oid, "shipping_id": 1, "tracking_number": "T"}
    )
    assert r.status_code == 504
    assert emu.shipments_for(oid) == []
    assert emu.requests[-1].fault == "timeout" and emu.requests[-1].status == 504


def test_hung_request_with_gone_client_is_logged_quietly(
    emu: StoreEmulator, http: requests.Session, capfd: pytest.CaptureFixture[str]
) -> None:
    emu.set_fault("orders.list", Fault(timeout_rate=1.0, hang_seconds=0.5))
    with pytest.raises(requests.Timeout):
        http.get(api(emu, "orders"), timeout=0.1)
    deadline = time.monotonic() + 5
    while emu.count("orders.list") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)
    assert emu.requests[-1].status == 200  # its final status
    out, err = capfd.readouterr()
    assert err == "" and out == ""


def test_fault_rate_limit_next(emu: StoreEmulator, http: requests.Session) -> None:
    emu.set_fault("*", Fault(rate_limit_next=2, retry_after=7))
    for _ in range(2):
        r = http.get(api(emu, "orders"))
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert http.get(api(emu, "orders")).status_code == 200
    assert emu.count("orders.list") == 3 and emu.count(method="GET") == 3


def test_fault_unauthorized_and_html(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order(status="P")
    emu.set_fault("orders.get", Fault(unauthorized=True))
    r = http.get(api(emu, f"orders/{oid}"))
    assert r.status_code == 401 and r.json() == {"message": "Unauthorized", "status": 401}
    emu.set_fault("orders.update", Fault(html_body=True))
    r = http.put(api(emu, f"orders/{oid}"), json={"status": "C"})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    with pytest.raises(requests.JSONDecodeError):
        r.json()
    assert emu.orders[oid].status == "P"  # a proxy page: nothing applied
    emu.clear_faults()
    assert http.get(api(emu, f"orders/{oid}")).status_code == 200
    with pytest.raises(ValueError, match="unknown endpoint"):
        emu.set_fault("orders.delete", Fault())


def test_endpoint_fault_wins_over_star(emu: StoreEmulator, http: requests.Session) -> None:
    emu.set_fault("*", Fault(error_rate=1.0))
    emu.set_fault("statuses.list", Fault())
    assert http.get(api(emu, "statuses")).status_code == 200
    assert http.get(api(emu, "orders")).status_code == 503


def test_request_log(emu: StoreEmulator, http: requests.Session) -> None:
    http.get(api(emu, "orders"), params={"status[]": ["P", "C"]})
    http.get(emu.url + "/api/nothing")
    first, second = emu.requests
    assert first.endpoint == "orders.list" and first.query == {"status[]": ["P", "C"]}
    assert second.endpoint is None and second.status == 404
    emu.clear_log()
    assert emu.count() == 0


# ---- server behaviour --------------------------------------------------------------------------
def test_concurrent_requests_and_keep_alive(emu: StoreEmulator) -> None:
    oid = emu.add_order(products=[{"product_code": "A", "amount": 100}])
    (iid,) = item_ids(emu, oid)
    codes: list[int] = []

    def worker() -> None:
        with requests.Session() as s:
            s.auth = AUTH
            for _ in range(10):
                r = s.post(
                    api(emu, "shipments"),
                    json={
                        "order_id": oid,
                        "shipping_id": 1,
                        "carrier": "dhl",
                        "products": {iid: 1},
                    },
                )
                codes.append(r.status_code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(201) == 80
    line = emu.get_order_json(oid)["products"][iid]
    assert line["shipped_amount"] == "80" and line["shipment_amount"] == 20


def test_restart_keeps_port_and_state() -> None:
    emu = StoreEmulator(api_user=USER, api_key=KEY).start()
    try:
        url = emu.url
        oid = emu.add_order()
        emu.stop()
        emu.start()
        assert emu.url == url
        assert requests.get(api(emu, f"orders/{oid}"), auth=AUTH, timeout=5).status_code == 200
    finally:
        emu.stop()


def test_demo_seed(emu: StoreEmulator, http: requests.Session) -> None:
    created = seed_demo_store(emu)
    assert emu.product_by_code("Test001") and emu.product_by_code("Test003")
    body = http.get(api(emu, "orders"), params={"items_per_page": 0}).json()
    assert len(body["orders"]) == len(created["orders"]) >= 5
    assert {o["status"] for o in body["orders"]} == {"P", "O", "C"}
    countries = {emu.get_order_json(int(o["order_id"]))["s_country"] for o in body["orders"]}
    assert countries == {"AU", "NZ", "US"}


def test_demo_seed_old_store() -> None:
    with StoreEmulator(version=(4, 9)) as emu:
        seed_demo_store(emu)
        assert any(p["tracking"] == "O" for p in emu.products.values())
        assert len(emu.combinations) == 2


# ---- scale ----------------------------------------------------------------------------------------
def test_history_of_100k_is_quick_and_small(emu: StoreEmulator, http: requests.Session) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    ids = emu.add_history(
        100_000, start_timestamp=datetime(2020, 1, 1, tzinfo=UTC), step_seconds=30
    )
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ids) == 100_000 and ids[0] == 1
    assert elapsed < 5.0
    assert peak < 120_000_000
    new = emu.add_order(status="P")
    assert new == 100_001
    started = time.perf_counter()
    body = http.get(api(emu, "orders"), params={"status": "P"}).json()
    assert [o["order_id"] for o in body["orders"]] == [str(new)]
    deep: dict[str, str | int] = {
        "sort_by": "order_id",
        "sort_order": "asc",
        "page": 5000,
        "get_orders_data": 1,
    }
    body = http.get(api(emu, "orders"), params=deep).json()
    assert body["orders"][0]["order_id"] == "49991" and body["params"]["total_items"] == "100001"
    assert time.perf_counter() - started < 2.0


def test_chunked_body_is_read(emu: StoreEmulator, http: requests.Session) -> None:
    oid = emu.add_order(status="P")
    chunks = iter([b'{"status":', b'"C"}'])  # a generator body goes out chunked
    r = http.put(
        api(emu, f"orders/{oid}"), data=chunks, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and emu.orders[oid].status == "C"


def test_truncated_request_changes_nothing(emu: StoreEmulator) -> None:
    oid = emu.add_order(status="P")
    token = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    head = (
        f"PUT /api/orders/{oid} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((emu.host, emu.port), timeout=5) as sock:
        sock.sendall(head.encode() + b'{"status": "C"}')
        sock.shutdown(socket.SHUT_WR)  # the client dies mid-upload
        assert sock.recv(100) == b""  # closed without an answer
    assert emu.orders[oid].status == "P" and emu.count() == 0
