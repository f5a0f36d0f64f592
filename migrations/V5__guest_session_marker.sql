-- A guest cart whose merge into a user's cart finished carries the time it was merged away.
-- Its session then behaves like no session: a write with it starts a new guest cart, never
-- this one again. NULL for every other cart. Older edges ignore the column (expand only).
ALTER TABLE carts ADD COLUMN merged_at timestamptz;
