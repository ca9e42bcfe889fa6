"""The engine: where each 999 and 101 call goes. Pure and synchronous: no I/O, no clock."""
