"""Site provider (edge): represents one VMM server of a site. Registers with a registration key,
heartbeats, and publishes signed discovery snapshots and changes of the site's clouds, hosts,
VMs and VM networks (from its site description and its hosts' storage folders)."""
