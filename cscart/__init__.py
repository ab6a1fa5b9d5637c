"""Everything that knows CS-Cart: the REST client (the only code that speaks HTTP to a store)
and a faithful store emulator for tests, benchmarks and the demo."""
