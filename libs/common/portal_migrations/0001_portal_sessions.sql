-- Admin-portal sign-in state, in the schema of each service that serves portal pages.
-- Tokens are stored as SHA-256 hashes, so a database dump cannot be replayed as a cookie.
CREATE TABLE portal_sign_ins (
    state_hash  bytea       PRIMARY KEY,
    flow        text        NOT NULL,  -- field ciphertext: msal's flow (PKCE verifier, nonce)
    return_to   text        NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE TABLE portal_sessions (
    token_hash  bytea       PRIMARY KEY,
    tenant_id   text        NOT NULL,
    user_oid    text        NOT NULL,
    upn         text        NOT NULL,
    roles       text[]      NOT NULL,
    csrf_token  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX portal_sessions_expiry ON portal_sessions (expires_at);
