"""The HTTP routes, one module per endpoint family; `common` holds what they share."""
