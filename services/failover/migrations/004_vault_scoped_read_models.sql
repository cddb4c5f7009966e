-- Read models of inventory and policy objects are keyed by (vault, id): an object id from one
-- vault can never overwrite or be read for another vault's failover. The rows stay.

ALTER TABLE rm_vms DROP CONSTRAINT rm_vms_pkey, ADD PRIMARY KEY (vault_id, vm_id);
ALTER TABLE rm_networks DROP CONSTRAINT rm_networks_pkey, ADD PRIMARY KEY (vault_id, network_id);
ALTER TABLE rm_clouds DROP CONSTRAINT rm_clouds_pkey, ADD PRIMARY KEY (vault_id, cloud_id);
ALTER TABLE rm_mappings DROP CONSTRAINT rm_mappings_pkey, ADD PRIMARY KEY (vault_id, mapping_id);
