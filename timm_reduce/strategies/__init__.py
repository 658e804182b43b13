"""Built-in strategies; importing this package registers them."""
from . import grouped, shallow, thin  # noqa: F401
