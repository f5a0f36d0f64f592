-- The cart lifecycle: merges, orders, stock reservations, the event outbox and retention.

-- A guest cart being merged into a user's cart is frozen (`merging_into`, at `merge_version`)
-- until the merge finishes. A purged cart keeps its row, emptied and with a bumped version, as
-- a tombstone (`purged_at`), so versions keep growing for caches and clients that saw it.
ALTER TABLE carts
    ADD COLUMN merging_into  text,
    ADD COLUMN merge_version bigint,
    ADD COLUMN purged_at     timestamptz;
CREATE INDEX carts_purged_at_idx ON carts (purged_at) WHERE purged_at IS NOT NULL;

-- Merges applied to a user's cart, one per frozen guest cart version: a retried merge finds
-- its record and does not add twice.
CREATE TABLE cart_merges (
    user_owner    text        NOT NULL,
    guest_owner   text        NOT NULL,
    guest_version bigint      NOT NULL,
    report        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_owner, guest_owner, guest_version)
);
CREATE INDEX cart_merges_created_at_idx ON cart_merges (created_at);

-- Orders live on the owner's shard.
CREATE TABLE orders (
    order_id               text        PRIMARY KEY,
    owner                  text        NOT NULL,
    status                 text        NOT NULL
        CHECK (status IN ('pending_payment', 'paid', 'cancelled', 'expired')),
    currency               text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    total_minor            bigint      NOT NULL CHECK (total_minor >= 0),
    items                  jsonb       NOT NULL,
    reservation_expires_at timestamptz NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_owner_idx ON orders (owner);
CREATE INDEX orders_pending_idx ON orders (reservation_expires_at)
    WHERE status = 'pending_payment';

-- Stock held for an order, on the catalog's primary. `items` is [{"item_id", "quantity"}].
CREATE TABLE stock_reservations (
    reservation_id text        PRIMARY KEY,
    status         text        NOT NULL CHECK (status IN ('held', 'committed', 'released')),
    items          jsonb       NOT NULL,
    expires_at     timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_reservations_held_idx ON stock_reservations (expires_at)
    WHERE status = 'held';

-- The transactional outbox: written in the transaction of the change it describes, published
-- by the relay to the home region's Redis Stream and then deleted.
CREATE TABLE cart_events (
    id           bigserial   PRIMARY KEY,
    owner        text        NOT NULL,
    cart_version bigint      NOT NULL,
    kind         text        NOT NULL,
    payload      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
