-- Each new sign-in and session removes some expired rows (portal_auth.py); this index lets it
-- find them without reading the table, which anonymous /auth/login requests can fill.
CREATE INDEX portal_sign_ins_expiry ON portal_sign_ins (expires_at);
