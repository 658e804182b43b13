"""Built-in strategies; importing this package registers them."""
from . import fips, grouped, morphreuse, shallow, thin  # noqa: F401
