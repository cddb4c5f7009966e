-- Who each question was asked of: an answer (an agent's CommandCompleted, replication's
-- materialise answer) counts only from that producer and within the same vault. Questions
-- asked before this table existed accept an answer from any producer of their vault.

CREATE TABLE questions (
    request_id uuid PRIMARY KEY,
    vault_id   uuid NOT NULL,
    addressee  text,
    at         timestamptz NOT NULL DEFAULT now()
);

INSERT INTO questions (request_id, vault_id, addressee)
SELECT t.command_id, j.vault_id, NULL FROM tasks t JOIN jobs j ON j.job_id = t.job_id
ON CONFLICT DO NOTHING;
