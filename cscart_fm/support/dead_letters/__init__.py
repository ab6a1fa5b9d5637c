"""Dead letters support staff can work with: kept, listed, shown, replayed, discarded, resolved.

- ``store``: the ``dead_letters`` table, its rows (``DeadLetter``), ``Filter``, the queries
  and the counts.
- ``collect``: moving the ``.dlq`` queues into the store (``collect``,
  ``DeadLetterCollector``), and the open count the alert watches.
- ``replay``: publishing a dead letter back where it was going, confirmed.
- ``resolve``: ``DeadLetterResolver``, which resolves dead letters once their key succeeds.
- ``masking``: shoppers' personal data, masked in every view unless revealed.
- ``audit``: who did what to which dead letter, from the console or the command line.
- ``desk``: the rules for replaying and discarding, the one place both ``cscart-fm dlq`` and
  the support console act through (and audit).
"""
