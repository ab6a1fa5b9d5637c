"""The only description of a message: FM contract events, client settings, CS-Cart payloads."""
