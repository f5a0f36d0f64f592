-- Parked adds: an add received in this region for a cart homed in another region that could
-- not be reached (timeout, open breaker, partition) is kept here, on the primary of this
-- region's first home shard (by shard id), until this region's reconciler has forwarded it.
--
-- A row is keyed by the cart's owner and the add's Idempotency-Key (the client's, or one the
-- edge minted and returned), so a client's retry while parked parks nothing twice and the
-- reconciler's retries after a lost answer are replays at home. `seq` is the arrival order the
-- reconciler forwards an owner's adds in. `body` is the add as the client sent it: the home
-- edge's idempotency fingerprint covers it, so it is forwarded byte for byte. A row the home
-- region refused (or that outlived `parking.max_age`) becomes `rejected` with the reason, and
-- is deleted by the owner's next read in this region, which reports it once. An add the home
-- applied is marked with the cart version home answered (`applied_version`) before this
-- region's cache is fenced and the row deleted: a read in between shows it only on a cart older
-- than that version, so it is seen neither twice nor not at all.
CREATE TABLE parked_writes (
    owner           text        NOT NULL,
    idempotency_key text        NOT NULL,
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    home            text        NOT NULL,
    home_shard      text        NOT NULL,
    body            text        NOT NULL,
    item_id         text        NOT NULL,
    line_id         text        NOT NULL,
    variant         jsonb,
    quantity        integer     NOT NULL CHECK (quantity BETWEEN 1 AND 999),
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'rejected')),
    reason_code     text,
    reason          text,
    attempts        integer     NOT NULL DEFAULT 0,
    applied_version bigint,
    parked_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, idempotency_key)
);
CREATE INDEX parked_writes_owner_seq_idx ON parked_writes (owner, seq);
CREATE INDEX parked_writes_pending_seq_idx ON parked_writes (seq) WHERE state = 'pending';
