-- An API token may expire: the read model keeps when (NULL: never).
ALTER TABLE known_tokens ADD COLUMN IF NOT EXISTS expires_at timestamptz;
