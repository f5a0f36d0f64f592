-- Replication heartbeat: the home region's edges stamp each shard every second; other regions
-- read the stamp from their replica to know how far behind it is (pt-heartbeat style, so an
-- idle primary does not look like a lagging replica).
CREATE TABLE replication_heartbeat (
    shard text        PRIMARY KEY,
    at    timestamptz NOT NULL
);
