-- A cart line is its item and its variant: lines are keyed by (owner, line_id) instead of
-- (owner, item_id), so one item in two variants is two lines.
--
-- The line id is computed by the edge (`domain::variant::LineId`) and stored: the item id when
-- the variant is null, else the item id, '~' and the first 8 bytes of SHA-256 over the
-- variant's canonical JSON as 16 lowercase hex digits. Canonical JSON is the edge's rule (keys
-- sorted by UTF-8 bytes, no whitespace, JSON's minimal string escapes), not jsonb's text output
-- (which orders keys by length first and adds spaces). `cartedge_canonical_variant` below
-- reproduces it for the backfill of existing rows; `tests/api/cart.rs` checks the two agree.
-- They can differ only for non-integer numbers jsonb has rewritten (1e2 is stored as 100): such
-- a backfilled line gets a different id than a new add of the same variant would, so that add
-- makes a second line; no existing line is lost or merged wrongly.
--
-- Rollout (expand/contract): deploy the edges of this version first, then migrate. This
-- version works on both schemas: on V3 it writes as the edges before it did (a line per item;
-- it checks for the line_id column in the statement that locks the cart) and derives line ids
-- when reading, so regions and edges on either side of this migration keep working together.
-- Older edges read V4 rows with their old cart query (same columns), but their adds and merges
-- upsert ON CONFLICT (owner, item_id), which has no unique index to arbitrate on V4 (an error,
-- nothing written): a region applies V4 only once all of its edges run this version. Writes to
-- a shard happen only in its home region, so other regions' versions do not matter for that.

CREATE FUNCTION cartedge_canonical_variant(value jsonb) RETURNS text
    LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    result text;
BEGIN
    CASE jsonb_typeof(value)
        WHEN 'object' THEN
            SELECT '{' || coalesce(string_agg(
                       to_jsonb(entry.key)::text || ':' || cartedge_canonical_variant(entry.value),
                       ',' ORDER BY entry.key COLLATE "C"), '') || '}'
              INTO result
              FROM jsonb_each(value) AS entry;
        WHEN 'array' THEN
            SELECT '[' || coalesce(string_agg(cartedge_canonical_variant(element.value), ','
                       ORDER BY element.position), '') || ']'
              INTO result
              FROM jsonb_array_elements(value) WITH ORDINALITY AS element(value, position);
        ELSE
            result := value::text;
    END CASE;
    RETURN result;
END
$$;

CREATE FUNCTION cartedge_line_id(item_id text, variant jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN variant IS NULL OR variant = 'null'::jsonb THEN item_id
        ELSE item_id || '~' || left(encode(sha256(convert_to(
                 cartedge_canonical_variant(variant), 'UTF8')), 'hex'), 16)
    END
$$;

ALTER TABLE cart_items ADD COLUMN line_id text;
UPDATE cart_items SET line_id = cartedge_line_id(item_id, variant);
ALTER TABLE cart_items ALTER COLUMN line_id SET NOT NULL;
ALTER TABLE cart_items DROP CONSTRAINT cart_items_pkey;
ALTER TABLE cart_items ADD PRIMARY KEY (owner, line_id);
