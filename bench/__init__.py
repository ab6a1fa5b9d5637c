"""Benchmarks of cscart-fm: ``python -m bench.run`` (see docs/benchmarks.md).

They print figures; nothing here asserts a time. Each benchmark runs on a fresh RabbitMQ vhost,
a fresh SQLite state file and the CS-Cart store emulator in a process of its own.
"""
