"""Inventory service: applies site providers' discovery snapshots and changes (clouds, host
groups, hosts, VMs with disks and NICs, VM networks), serves them over REST and emits
CloudChanged / HostChanged / VmChanged / NetworkChanged on `inventory.events.v1`."""
