"""cscart-fm: the bridge between FM (NPFulfilment's warehouse system) and CS-Cart stores."""

__version__ = "0.1.0"
