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
//! This module owns transaction boundaries only: it issues no statement besides `BEGIN`,
//! `COMMIT` and `ROLLBACK`, and knows nothing about carts, orders or events.

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
        })
    }

    /// The connection, for statements inside the transaction.
    pub fn connection(&self) -> Result<&C, StoreError> {
        self.connection
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("transaction already finished".into()))
    }

    /// Sends `COMMIT`. When it fails the outcome is unknown to us: the error is returned and the
    /// connection discarded.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        let connection = self
            .connection
            .take()
            .ok_or_else(|| StoreError::Unavailable("transaction already finished".into()))?;
        match connection.session().batch_execute("COMMIT").await {
            Ok(()) => Ok(()),
            Err(error) => {
                connection.discard();
                Err(error.into())
            }
        }
    }

    /// Sends `ROLLBACK`; a connection that cannot roll back is discarded (the server aborts the
    /// transaction when it closes). Never fails: nothing was committed either way.
    pub async fn rollback(mut self) {
        self.rollback_in_place().await
    }

    /// [`Transaction::rollback`] for callers that only borrow the guard; it is finished after.
    pub async fn rollback_in_place(&mut self) {
        if let Some(connection) = self.connection.take() {
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
            connection.discard();
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
