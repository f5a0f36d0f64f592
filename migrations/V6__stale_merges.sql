-- Stale merges: the janitor finishes or rolls back a merge nobody retried.
--
-- A frozen guest cart carries when its freeze was taken or last confirmed by a retry
-- (`merge_started_at`) and the shard of the user's cart it is merged into (`merge_user_shard`),
-- where the janitor asks whether the merge reached the user's cart. Freezes taken by older
-- edges have neither and are left to the guest cart's lifetime, as before.
ALTER TABLE carts
    ADD COLUMN merge_started_at timestamptz,
    ADD COLUMN merge_user_shard text;
CREATE INDEX carts_merge_started_at_idx ON carts (merge_started_at)
    WHERE merging_into IS NOT NULL;

-- A record whose `abandoned_at` is set is a fence, not a merge: the janitor rolled that frozen
-- guest version back, and an edge that still holds its snapshot must not apply it. Older edges
-- read such a record as an applied merge with an empty report: they add nothing, but during a
-- rolling upgrade one that meets a fence before the janitor lifted the freeze would empty the
-- guest cart (upgrade the edges of a region together, or keep the janitor off until done).
ALTER TABLE cart_merges ADD COLUMN abandoned_at timestamptz;
