"""Host agent (edge): one Hyper-V host's worth of VMs. Registers with a vault's registration
key, heartbeats, and (replication issue) tracks changed blocks and ships delta cycles."""
