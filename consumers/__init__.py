"""The three jobs of the bridge, one consumer each, each a small handler over the runtime.

- ``order_poll``: on an order-poll tick, pull a client's new CS-Cart orders into FM.
- ``shipment_lodged``: when FM lodges a shipment, create it in CS-Cart and set the status.
- ``stock_snapshot``: from FM's stock snapshots, set the quantities in CS-Cart.
"""
