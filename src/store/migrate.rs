//! Schema migrations: the plain SQL files in `migrations/`, embedded at build time and tracked
//! by refinery in `refinery_schema_history`. Forward-only, expand/contract.

use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Session-level advisory lock key so two edges migrating at once apply each file once.
const MIGRATION_LOCK: i64 = 0x6361_7274_6d69_6772; // "cartmigr"

/// Applies every pending migration to the database at `dsn`; returns the applied versions.
pub async fn run(dsn: &str) -> anyhow::Result<Vec<String>> {
    let (mut client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    let driver = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let report = embedded::migrations::runner().run_async(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    let report = report?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect())
}
