"""`drctl`: the operator command line of the platform (vaults, tokens, keys, sites, inventory,
policies, cloud pairings, network mappings, prerequisite checks) over the services' REST APIs."""
