-- An API token may be issued with an expiry (NULL: it never expires).
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
