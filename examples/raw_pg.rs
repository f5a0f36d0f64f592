//! The database baseline: a hyper 1.x server whose every request runs one PostgreSQL statement
//! and nothing else, on the same runtime, driver and pool the edge uses, so the edge's cold
//! reads and local writes can be compared with what the database allows in the same run
//! (BENCHMARKS.md).
//!
//! - `read`: the edge's cart read (one prepared `SELECT` of a cart and its lines) for owner
//!   `u:lg-user-<n>`, `n` cycling over `--owners`, on the given (replica) DSN; the rows are
//!   answered as a small JSON array.
//! - `write`: one durable single-row transaction on the given (primary) DSN: `BEGIN`, an upsert
//!   bumping a cart's version, `COMMIT` (with the server's `synchronous_commit`), for owner
//!   `u:raw-<n>`.
//!
//! `cargo run --release --example raw_pg -- 127.0.0.1:8098 read "host=127.0.0.1 port=… dbname=cartedge user=…" 6000`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// The edge's cart read (`store::carts`), text for text.
const READ: &str = "SELECT c.currency, c.version, c.updated_at, i.item_id, i.quantity, \
     i.variant, i.unit_price_minor, i.added_at, i.updated_at, to_jsonb(i) ->> 'line_id' \
     FROM carts c LEFT JOIN cart_items i ON i.owner = c.owner \
     WHERE c.owner = $1 ORDER BY i.added_at, i.item_id, 10";

const WRITE: &str = "INSERT INTO carts (owner, currency, version) VALUES ($1, 'SGD', 1) \
     ON CONFLICT (owner) DO UPDATE SET version = carts.version + 1, updated_at = now()";

/// The edge's default `database.pool_size`.
const POOL_SIZE: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Read,
    Write,
}

struct State {
    pool: Pool,
    mode: Mode,
    owners: u64,
    next: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, address, mode, dsn, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: raw_pg <listen address> read|write <dsn> [owners, default 6000]");
    };
    let mode = match mode.as_str() {
        "read" => Mode::Read,
        "write" => Mode::Write,
        other => anyhow::bail!("mode must be read or write, not {other}"),
    };
    let owners = rest.first().map_or(Ok(6000), |n| n.parse::<u64>())?.max(1);
    let config: tokio_postgres::Config = dsn.parse()?;
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(POOL_SIZE).build()?;
    let state = Arc::new(State {
        pool,
        mode,
        owners,
        next: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(address).await?;
    eprintln!("raw PostgreSQL responder on {address}");
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request: Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move {
                    let response = match answer(&state).await {
                        Ok(body) => json(StatusCode::OK, body),
                        Err(error) => json(
                            StatusCode::SERVICE_UNAVAILABLE,
                            Bytes::from(format!("{{\"error\":{:?}}}", error.to_string())),
                        ),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(state: &State) -> anyhow::Result<Bytes> {
    let n = state.next.fetch_add(1, Ordering::Relaxed) % state.owners + 1;
    let mut client = state.pool.get().await?;
    match state.mode {
        Mode::Read => {
            let owner = format!("u:lg-user-{n}");
            let statement = client.prepare_cached(READ).await?;
            let rows = client.query(&statement, &[&owner]).await?;
            let mut lines = Vec::with_capacity(rows.len());
            for row in &rows {
                let item: Option<String> = row.try_get(3)?;
                let quantity: Option<i32> = row.try_get(4)?;
                lines.push(serde_json::json!({"item_id": item, "quantity": quantity}));
            }
            Ok(Bytes::from(serde_json::to_vec(&lines)?))
        }
        Mode::Write => {
            let owner = format!("u:raw-{n}");
            let transaction = client.transaction().await?;
            let statement = transaction.prepare_cached(WRITE).await?;
            transaction.execute(&statement, &[&owner]).await?;
            transaction.commit().await?;
            Ok(Bytes::from_static(b"{}"))
        }
    }
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}
