"""Built-in strategies; importing this package registers them."""
from . import grouped, morphreuse, shallow, thin  # noqa: F401
