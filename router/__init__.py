"""overflow-router: automatic, auditable failover of 999 and 101 calls between police forces."""

__version__ = "0.1.0"
