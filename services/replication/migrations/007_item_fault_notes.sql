-- What the service noted about an item besides its state: why its cycles cannot be stored in
-- the replica store (disk full, I/O error) and why a delta record of it was dead-lettered.
-- Both show in the item's health (and the first in its error) until a cycle of it commits
-- again. Kept here, not in the process, so a restart keeps them and every instance sees them.
-- No foreign key: a note is written on a connection of its own while the failed record's
-- transaction, which may hold the item's row lock, is still open (and then rolls back).
CREATE TABLE item_fault_notes (
    item_id uuid PRIMARY KEY,
    storage_fault text,
    dead_letter text,
    noted_at timestamptz NOT NULL DEFAULT now()
);
