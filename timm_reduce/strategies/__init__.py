"""Built-in strategies; importing this package registers them."""
from . import fips, grouped, shallow, thin  # noqa: F401
