"""HTTP routers, one per area of the Tinker API."""
