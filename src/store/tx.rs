//! Transactions: the one way the store begins a transaction, runs work in it, commits or rolls
//! back, and maps the error.
//!
//! [`Transaction`] is the guard: `BEGIN` on a connection, then an explicit [`Transaction::commit`]
//! or [`Transaction::rollback`]. A guard dropped unfinished (a panic, a cancelled request) or a
//! connection whose `COMMIT`/`ROLLBACK` failed is never reused: a pooled connection is taken out
//! of its pool and closed, which makes the server abort whatever is still open. [`run`] and
//! [`run_if`] wrap the guard around one async closure for the common "do this atomically" case;
//! `WriteTx` (the cart mutation transaction) holds a guard across several calls.
//!
//! A guard can also save round trips: [`Transaction::deferred`] sends `BEGIN` in one pipeline
//! with the transaction's first statements ([`Transaction::open_with`]), and
//! [`Transaction::commit_with`] sends the last statements and `COMMIT` in one pipeline.
//! PostgreSQL runs a pipeline's messages in order, so each statement still sees what the ones
//! before it did, and a statement that fails aborts the transaction: the `COMMIT` behind it
//! then rolls back instead, and the failure is what the caller gets.
//!
//! This module owns transaction boundaries only: it issues no statement besides `BEGIN`,
//! `COMMIT` and `ROLLBACK`, and knows nothing about carts, orders or events.

use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Object;

use super::StoreError;

/// A connection a transaction can run on.
pub trait Connection {
    /// The PostgreSQL session the transaction statements go to.
    fn session(&self) -> &tokio_postgres::Client;
    /// Called when the transaction's end is unknown (unfinished guard, failed `COMMIT` or
    /// `ROLLBACK`): the connection must not be used for anything else.
    fn discard(self);
}

/// Pooled connections (every request path): discarding takes the connection out of its pool
/// and closes it.
impl Connection for Object {
    fn session(&self) -> &tokio_postgres::Client {
        self
    }

    fn discard(self) {
        drop(Object::take(self));
    }
}

/// A borrowed client (the catalog commands of the `cartedge` binary). It cannot be closed from
/// here: its owner drops it on the error this module returns.
impl Connection for &tokio_postgres::Client {
    fn session(&self) -> &tokio_postgres::Client {
        self
    }

    fn discard(self) {}
}

/// An open transaction. Finish it with [`Transaction::commit`] or [`Transaction::rollback`];
/// dropping it unfinished discards the connection.
pub struct Transaction<C: Connection> {
    connection: Option<C>,
    /// Whether `BEGIN` was sent (a [`Transaction::deferred`] guard sends it with its first
    /// statements; until then there is nothing to end).
    begun: AtomicBool,
    /// Whether [`Transaction::commit_with`] ended the transaction (the connection is clean).
    ended: AtomicBool,
}

impl<C: Connection> Transaction<C> {
    /// Sends `BEGIN`. A connection that cannot begin is discarded.
    pub async fn begin(connection: C) -> Result<Transaction<C>, StoreError> {
        if let Err(error) = connection.session().batch_execute("BEGIN").await {
            connection.discard();
            return Err(error.into());
        }
        Ok(Transaction {
            connection: Some(connection),
            begun: AtomicBool::new(true),
            ended: AtomicBool::new(false),
        })
    }

    /// A guard whose `BEGIN` goes out with its first statements ([`Transaction::open_with`] or
    /// [`Transaction::open`]), saving a round trip. Nothing is sent yet.
    pub fn deferred(connection: C) -> Transaction<C> {
        Transaction {
            connection: Some(connection),
            begun: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// The connection with the transaction begun: `BEGIN` is sent first if it was deferred.
    pub async fn open(&self) -> Result<&C, StoreError> {
        self.open_with(|connection| std::future::ready(Ok(connection)))
            .await
    }

    /// Runs `statements` in the transaction. If `BEGIN` was deferred it is sent first, in the
    /// same pipeline: `statements` is polled right after it, so whatever it sends follows
    /// `BEGIN` on the wire. A failed `BEGIN` fails the call (the statements behind it then
    /// failed too: they ran on the same broken session).
    pub async fn open_with<'a, T, F>(
        &'a self,
        statements: impl FnOnce(&'a C) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + 'a,
    {
        let connection = self.connection()?;
        if self.begun.swap(true, Ordering::AcqRel) {
            return statements(connection).await;
        }
        let (begun, result) = tokio::join!(
            connection.session().batch_execute("BEGIN"),
            statements(connection)
        );
        begun?;
        result
    }

    /// The connection, for statements inside the transaction.
    pub fn connection(&self) -> Result<&C, StoreError> {
        self.connection
            .as_ref()
            .filter(|_| !self.ended.load(Ordering::Acquire))
            .ok_or_else(|| StoreError::Unavailable("transaction already finished".into()))
    }

    /// Sends `COMMIT`. When it fails the outcome is unknown to us: the error is returned and the
    /// connection discarded.
    pub async fn commit(self) -> Result<(), StoreError> {
        if !self.begun.load(Ordering::Acquire) {
            // Nothing was sent: nothing to commit, and the connection goes back as it came.
            return Ok(());
        }
        self.connection()?.session().batch_execute("COMMIT").await?;
        // Dropping a guard whose COMMIT failed (above) discards its connection.
        self.ended.store(true, Ordering::Release);
        Ok(())
    }

    /// Sends the transaction's last statements and `COMMIT` in one pipeline. `statements` must
    /// send everything it sends when first polled: statements prepared beforehand (a
    /// `prepare_cached` inside would put its round trip, and the statement behind it, after
    /// the `COMMIT`) whose parameters encode (checked beforehand: an encoding error would keep
    /// the statement off the wire and let the `COMMIT` through without it). A statement the
    /// server refuses aborts the transaction, so the `COMMIT` rolls it back and its error is
    /// returned; a failed `COMMIT` leaves the outcome unknown: the connection is discarded.
    /// The guard is finished after this call either way.
    pub async fn commit_with<'a, T, F>(
        &'a self,
        statements: impl FnOnce(&'a C) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + 'a,
    {
        let connection = self.connection()?;
        if !self.begun.swap(true, Ordering::AcqRel) {
            // Nothing was sent yet: these statements need a transaction of their own.
            connection.session().batch_execute("BEGIN").await?;
        }
        let (result, committed) = tokio::join!(
            statements(connection),
            connection.session().batch_execute("COMMIT")
        );
        // Ended (committed, or rolled back by the server) unless COMMIT failed: then the
        // outcome is unknown and dropping the guard discards the connection.
        committed?;
        self.ended.store(true, Ordering::Release);
        result
    }

    /// Sends `ROLLBACK`; a connection that cannot roll back is discarded (the server aborts the
    /// transaction when it closes). Never fails: nothing was committed either way.
    pub async fn rollback(mut self) {
        self.rollback_in_place().await
    }

    /// [`Transaction::rollback`] for callers that only borrow the guard; it is finished after.
    pub async fn rollback_in_place(&mut self) {
        if let Some(connection) = self.connection.take() {
            if !self.begun.load(Ordering::Acquire) || self.ended.load(Ordering::Acquire) {
                // Nothing open: the connection goes back as it is.
                return;
            }
            if connection
                .session()
                .batch_execute("ROLLBACK")
                .await
                .is_err()
            {
                connection.discard();
            }
        }
    }

    /// Commits when `result` is `Ok` and `commit_when` agrees, else rolls back; returns `result`
    /// (or the `COMMIT` error).
    pub async fn finish<T>(
        self,
        result: Result<T, StoreError>,
        commit_when: impl FnOnce(&T) -> bool,
    ) -> Result<T, StoreError> {
        match &result {
            Ok(value) if commit_when(value) => self.commit().await?,
            _ => self.rollback().await,
        }
        result
    }
}

impl<C: Connection> Drop for Transaction<C> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            if self.begun.load(Ordering::Acquire) && !self.ended.load(Ordering::Acquire) {
                connection.discard();
            }
        }
    }
}

/// Runs `work` in one transaction on `connection`: committed when it returns `Ok`, rolled back
/// when it returns an error.
pub async fn run<C, T>(
    connection: C,
    work: impl AsyncFnOnce(&C) -> Result<T, StoreError>,
) -> Result<T, StoreError>
where
    C: Connection,
{
    run_if(connection, work, |_| true).await
}

/// [`run`], but an `Ok` result is committed only when `commit_when` says so (work that found
/// nothing to keep, or a refusal decided half-way, rolls back its partial changes).
pub async fn run_if<C, T>(
    connection: C,
    work: impl AsyncFnOnce(&C) -> Result<T, StoreError>,
    commit_when: impl FnOnce(&T) -> bool,
) -> Result<T, StoreError>
where
    C: Connection,
{
    let transaction = Transaction::begin(connection).await?;
    let result = work(transaction.connection()?).await;
    transaction.finish(result, commit_when).await
}
