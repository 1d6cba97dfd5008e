-- A STOP reply names the patient's number; the appointments holding it for that sending number
-- were found by decrypting every number held for it (~44 us each, 0.9 s at 20,000, inside the
-- webhook's transaction). Each held number now has, beside its ciphertext, the keyed hash
-- opt_outs already keeps (phones.recipient_hash of its E.164 form), computed by the consumer as
-- it stores the number, so optout.held_for finds them by index.
--
-- recipient_hash is set exactly while phone_encrypted is: NULL when no number is held (never
-- stored, or purged), '' for a number held that does not decrypt or is not one SMS can go to
-- (the dispatcher refuses it; no reply is ever matched to it). NULL beside a number is a row
-- stored before this migration, or by a replica of the previous release during the rollout:
-- only decryption could fill it in, so held_for decrypts those rows, and only those, as before
-- (fewer and fewer: none once their visits have ended and the purger has cleared them).
ALTER TABLE appointments ADD COLUMN recipient_hash text;

-- The lookup by hash, then joined to integrations for the sending number. The sender is not in
-- the index: it is on integrations (sms_from_number), can change with the configuration and be
-- shared by integrations, and a patient holds few numbers however many are held in all.
CREATE INDEX appointments_recipient_hash ON appointments (recipient_hash)
    WHERE phone_encrypted IS NOT NULL;
-- The rows held_for still decrypts, per integration: empty once those rows are purged, so the
-- fallback costs nothing then (a later release may drop it).
CREATE INDEX appointments_phone_unhashed ON appointments (integration_id)
    WHERE phone_encrypted IS NOT NULL AND recipient_hash IS NULL;

-- A number purged takes its hash with it, whoever purges it: this release clears both in its
-- statements, and this also covers a replica of the previous release (during the rollout, or
-- after a rollback) that clears phone_encrypted alone.
CREATE FUNCTION appointments_hash_follows_phone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.recipient_hash := NULL;
    RETURN NEW;
END;
$$;
CREATE TRIGGER appointments_phone_purged BEFORE UPDATE OF phone_encrypted ON appointments
    FOR EACH ROW WHEN (NEW.phone_encrypted IS NULL AND NEW.recipient_hash IS NOT NULL)
    EXECUTE FUNCTION appointments_hash_follows_phone();
