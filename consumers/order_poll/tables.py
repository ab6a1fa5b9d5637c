"""The order-poll job's tables: the orders it imported (its outbox), its watermarks, and why
it skipped orders (for ``explain``)."""

from __future__ import annotations

from datetime import UTC

import sqlalchemy as sa

from cscart_fm.core.outbox import Entry, OutboxTable
from cscart_fm.core.state import UtcDateTime, metadata
from schemas.messages import OrderImported

imported_orders = sa.Table(
    "imported_orders",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("cart_order_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("order_no", sa.String(200), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # claimed | published
    # The exact body published (kept until the publish is recorded, then cleared: it holds a
    # shopper's address, and nothing needs it once FM has it).
    sa.Column("payload", sa.Text, nullable=True),
    sa.Column("cart_status", sa.String(8), nullable=False),
    sa.Column("placed_at", UtcDateTime(), nullable=False),
    sa.Column("claimed_at", UtcDateTime(), nullable=False),
    sa.Column("published_at", UtcDateTime(), nullable=True),
    # Only the claimed orders (almost always none), in id order (republish_claimed): a
    # full index on state would tempt SQLite to walk the whole history for other lookups.
    sa.Index(
        "ix_imported_orders_claimed",
        "client_id",
        "cart_order_id",
        sqlite_where=sa.text("state = 'claimed'"),
        postgresql_where=sa.text("state = 'claimed'"),
    ),
    # The console's "orders imported today" per client.
    sa.Index("ix_imported_orders_client_published", "client_id", "published_at"),
)

IMPORTED = OutboxTable(imported_orders, key=("cart_order_id",), noun="orders")
"""``imported_orders`` as the job's outbox: an order is claimed once, ever."""


def imported_entry(message: OrderImported) -> Entry:
    """The outbox entry publishing an order's ``order.imported``."""
    return IMPORTED.entry(
        (message.cart_order_id,),
        message,
        order_no=message.order_no,
        cart_status=message.cart_status[:8],
        placed_at=message.placed_at.astimezone(UTC),
    )


poll_watermarks = sa.Table(
    "poll_watermarks",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    # Store-clock Unix time: orders changed from (this - overlap) on are listed next time.
    sa.Column("updated_mark", sa.BigInteger, nullable=True),
    sa.Column("start_key", sa.String(100), nullable=False),
    sa.Column("filter_key", sa.String(64), nullable=False),
    sa.Column("last_mode", sa.String(16), nullable=False),
    sa.Column("last_started_at", UtcDateTime(), nullable=False),
    sa.Column("last_success_at", UtcDateTime(), nullable=False),
)

order_decisions = sa.Table(
    "order_decisions",
    metadata,
    sa.Column("client_id", sa.String(64), primary_key=True),
    sa.Column("cart_order_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("detail", sa.String(500), nullable=False),  # plain English, no personal data
    sa.Column("cart_status", sa.String(8), nullable=False),
    sa.Column("seen_at", UtcDateTime(), nullable=False),
    sa.Index("ix_order_decisions_client_seen", "client_id", "seen_at"),
)
