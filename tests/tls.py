"""The throwaway PKI of the demo, for tests (see `sitewarden.devpki`)."""

from sitewarden.devpki import DevPKI as TestPKI
from sitewarden.devpki import make_pki

TestPKI.__test__ = False  # type: ignore[attr-defined] - a fixture type, not a test class

__all__ = ["TestPKI", "make_pki"]
