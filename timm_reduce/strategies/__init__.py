"""Built-in strategies; importing this package registers them. A single-file method is one module (config dataclass
+ `apply`); a method with its own layers is a package (`fips/`, `morphreuse/`)."""
from . import fips, grouped, morphreuse, shallow, thin  # noqa: F401
