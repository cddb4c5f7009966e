"""Site provider (edge): represents one VMM server of a site. Registers with a registration key,
heartbeats and (inventory issue) publishes signed discovery snapshots."""
