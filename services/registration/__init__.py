"""Registration service: vaults, API tokens and roles, registration keys, site providers and
host agents, heartbeats and connection state."""
