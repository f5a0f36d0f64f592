-- Carts, their lines, idempotency keys and the catalog.

CREATE TABLE carts (
    owner      text        PRIMARY KEY,
    currency   text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    version    bigint      NOT NULL CHECK (version >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- The 30-day cleanup scans by last activity.
CREATE INDEX carts_updated_at_idx ON carts (updated_at);

CREATE TABLE cart_items (
    owner            text        NOT NULL REFERENCES carts (owner) ON DELETE CASCADE,
    item_id          text        NOT NULL,
    quantity         integer     NOT NULL CHECK (quantity BETWEEN 1 AND 999),
    unit_price_minor bigint      NOT NULL CHECK (unit_price_minor >= 0),
    currency         text        NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    variant          jsonb,
    added_at         timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, item_id)
);
CREATE INDEX cart_items_updated_at_idx ON cart_items (updated_at);

CREATE TABLE idempotency_keys (
    owner        text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    status       smallint    NOT NULL,
    headers      jsonb       NOT NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

CREATE TABLE catalog_items (
    item_id    text        PRIMARY KEY,
    name       text        NOT NULL,
    active     boolean     NOT NULL DEFAULT true,
    stock      integer     NOT NULL CHECK (stock >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE catalog_prices (
    item_id      text   NOT NULL REFERENCES catalog_items (item_id) ON DELETE CASCADE,
    currency     text   NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    amount_minor bigint NOT NULL CHECK (amount_minor >= 0),
    PRIMARY KEY (item_id, currency)
);
