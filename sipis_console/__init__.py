"""The ``sipis-console`` command line; the commands themselves live in the layers that own them."""
