"""The demo store: a few products (with variations, or option combinations on stores before
4.10) and recent orders on the test items, enough for the demo and a smoke test."""

from __future__ import annotations

import time

from .model import Store

# status, hours ago, country, firstname, lastname, e-mail, (product code, amount) per line
_ORDERS: tuple[tuple[str, int, str, str, str, str, tuple[tuple[str, int], ...]], ...] = (
    ("P", 30, "AU", "Jane", "Citizen", "jane@example.com", (("Test001", 2),)),
    ("P", 26, "NZ", "Aroha", "Ngata", "aroha@example.co.nz", (("Test002", 1), ("Test003", 3))),
    ("O", 20, "US", "John", "Smith", "john.smith@example.com", (("Test001", 1),)),
    ("C", 50, "AU", "Liam", "Nguyen", "liam@example.com.au", (("Test002", 2),)),
    ("P", 5, "AU", "Olivia", "Brown", "olivia@example.com.au", (("Test003", 1), ("Test001", 1))),
    ("P", 2, "US", "Emma", "Johnson", "emma.j@example.com", (("Test001", 1), ("Test002", 1))),
)
_TEE = "Organic Cotton Tee"
_TEE_SIZES = (("NPF-TEE-BLK-M", 12, "5"), ("NPF-TEE-BLK-L", 7, "6"))  # code, stock, option


def seed_demo_store(emu: Store) -> dict[str, list[int]]:
    """Products Test001-003 plus a few real-looking ones, and a handful of orders on the test
    items (AU/NZ/US; statuses P, O, C). Returns the ids created."""
    products = [
        emu.add_product("Test001", 100, product="Test item 1", price="10.00"),
        emu.add_product("Test002", 50, product="Test item 2", price="15.50"),
        emu.add_product("Test003", 0, product="Test item 3", price="7.25"),
        emu.add_product("NPF-MUG-350", 24, product="Enamel Camping Mug 350ml", price="14.95"),
    ]
    # a tee in two sizes: variations of a parent product, or combinations before 4.10
    tracking = "D" if emu.has_variations else "O"
    parent = emu.add_product("NPF-TEE", 0, product=_TEE, price="29.00", tracking=tracking)
    products.append(parent)
    if emu.has_variations:
        for code, amount, _ in _TEE_SIZES:
            products.append(
                emu.add_product(
                    code,
                    amount,
                    product=_TEE,
                    price="29.00",
                    product_type="V",
                    parent_product_id=parent,
                )
            )
    else:
        for code, amount, option in _TEE_SIZES:
            emu.add_combination(parent, code, amount, {"1": "1", "2": option})
    now = int(time.time())
    orders = [
        emu.add_order(
            status=status,
            timestamp=now - hours * 3600,
            s_country=country,
            firstname=firstname,
            lastname=lastname,
            email=email,
            products=[{"product_code": code, "amount": amount} for code, amount in lines],
        )
        for status, hours, country, firstname, lastname, email, lines in _ORDERS
    ]
    return {"products": products, "orders": orders}
