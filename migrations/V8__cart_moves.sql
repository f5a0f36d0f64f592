-- Cart moves: when the ring changes (`moving_from` in the ring file), a cart whose owner the new
-- ring places on another shard is moved there by three idempotent steps (`store::moves`).
--
-- `moving_to` is the shard the cart is being moved to: set by the freeze (step 1) on the old
-- shard, after which this edge release writes the cart only on the new shard. `moved_at` marks
-- the old row moved (step 3): its lines are deleted and its version kept, so the row is only a
-- pointer to `moving_to`, never stale items. On the new shard the copy (step 2) has neither.
-- Older edges ignore both columns (expand only); the cart read finds them through `to_jsonb`,
-- so a replica not yet migrated still reads carts.
ALTER TABLE carts
    ADD COLUMN moving_to text,
    ADD COLUMN moved_at  timestamptz;
