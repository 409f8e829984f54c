"""Services: sessions, op submission, futures (the protocol core, behind the routers)."""
