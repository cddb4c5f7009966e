-- Read models are keyed by (vault, id): an object id from one vault can never overwrite or
-- join with another vault's row. The rows stay; only their keys widen.

ALTER TABLE rm_hosts DROP CONSTRAINT rm_hosts_pkey, ADD PRIMARY KEY (vault_id, host_id);
ALTER TABLE rm_vms DROP CONSTRAINT rm_vms_pkey, ADD PRIMARY KEY (vault_id, vm_id);
ALTER TABLE rm_policies DROP CONSTRAINT rm_policies_pkey, ADD PRIMARY KEY (vault_id, policy_id);
ALTER TABLE rm_pairings DROP CONSTRAINT rm_pairings_pkey, ADD PRIMARY KEY (vault_id, pairing_id);

DROP INDEX protected_items_one_per_vm;
CREATE UNIQUE INDEX protected_items_one_per_vm ON protected_items (vault_id, vm_id) WHERE active;
