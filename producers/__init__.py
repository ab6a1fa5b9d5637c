"""Publishers of events: the order-poll tick producer and the hand-held event publisher."""
