//! Handlers of the internal (edge-to-edge, mutual-TLS) surface: cache invalidations from other
//! regions; the steps of a merge run on a guest cart homed here; the settling of a stale merge
//! into a user cart homed here (asked by the guest home's janitor); adds another region parked
//! for a cart homed here (sent by its reconciler), and which of them a cart here already holds
//! (asked by a read there). The ring check that guards this surface runs in `api::handle`
//! before routing; the steps' storage is `store::merge`. A request here continues the sending edge's trace (`traceparent`, read in `api::handle`), so
//! an invalidation or merge step logs under the trace of the write that caused it.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{command, request, response, Body};
use crate::app::App;
use crate::domain::cart::StoredCart;
use crate::domain::ids::OwnerKey;
use crate::forward;
use crate::store::merge::{self, FreezeOutcome};
use http::{Response, StatusCode};

/// Edge-to-edge bodies are small and from trusted peers; this bounds them all the same.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A merge step, run on the guest cart's home edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Freeze the guest cart and hand over its contents.
    Freeze,
    /// Empty and unfreeze the guest cart the user side has merged.
    Finalize,
    /// Lift the freeze of a merge the user side refused or the janitor rolled back (its
    /// snapshot fenced off on the user's shard). This release refuses no merge (a guest cart in
    /// another currency is re-priced); user-side edges of earlier releases refused carts in
    /// different currencies.
    Abort,
}

impl Step {
    pub const fn path(self) -> &'static str {
        match self {
            Step::Freeze => "/internal/v1/merge/freeze",
            Step::Finalize => "/internal/v1/merge/finalize",
            Step::Abort => "/internal/v1/merge/abort",
        }
    }
}

/// The body of every internal merge step.
#[derive(Debug, Serialize, Deserialize)]
pub struct MergeStep {
    pub guest: String,
    pub user: String,
    #[serde(default)]
    pub version: i64,
    /// The user cart's shard, recorded with a freeze so the janitor can settle a merge nobody
    /// retried. Absent from edges of earlier releases (their freezes are left to the guest
    /// cart's lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_shard: Option<String>,
}

/// A step's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepAnswer {
    pub status: StepStatus,
    #[serde(default)]
    pub version: i64,
    #[serde(default)]
    pub cart: Option<StoredCart>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Frozen,
    /// Another user's merge holds the guest cart.
    Busy,
    Ok,
}

/// `POST /internal/v1/invalidate`: fence this region's cache at the versions another region
/// committed.
pub async fn invalidate(app: &App, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let batch: forward::invalidate::Batch = request::parse_json(body)?;
    for cart in &batch.carts {
        app.store.cache.fence(&cart.owner, cart.version).await;
    }
    Ok(response::json(
        StatusCode::OK,
        br#"{"status":"ok"}"#.to_vec(),
    ))
}

/// `POST /internal/v1/merge/…`: a merge step for a guest cart homed here (called by the user's
/// home edge).
pub async fn merge_step(app: &App, step: Step, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let request: MergeStep = request::parse_json(body)?;
    let answer = run_step(app, step, &request).await?;
    Ok(response::json(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    ))
}

/// `POST /internal/v1/merge/settle`: whether a stale merge reached the user cart homed here,
/// fencing it off when it did not (`store::merge::settle`).
pub async fn merge_settle(app: &App, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let request: forward::settle::Request = request::parse_json(body)?;
    if !request.guest.starts_with("g:") || !request.user.starts_with("u:") {
        return Err(ApiError::InvalidRequest(
            "guest must be a guest owner and user a user owner".into(),
        ));
    }
    if !app.store.is_home(&request.user_shard) {
        return Err(ApiError::Misdirected);
    }
    let settled = merge::settle(
        &app.store,
        &request.user_shard,
        &request.user,
        &request.guest,
        request.version,
    )
    .await?;
    let decision = match settled {
        merge::Settled::Applied => forward::settle::Decision::Applied,
        merge::Settled::Fenced => forward::settle::Decision::Fenced,
    };
    Ok(response::json(
        StatusCode::OK,
        serde_json::to_vec(&forward::settle::Answer { decision }).unwrap_or_default(),
    ))
}

/// `POST /internal/v1/move/…`: a step of a cart move from a shard homed here (freeze or mark,
/// `store::moves`), asked by the edge that homes the shard the cart moves to.
pub async fn move_step(
    app: &App,
    step: forward::moves::Step,
    body: &[u8],
) -> Result<Response<Body>, ApiError> {
    use crate::store::moves;
    let request: forward::moves::Request = request::parse_json(body)?;
    if !(request.owner.starts_with("u:") || request.owner.starts_with("g:")) {
        return Err(ApiError::InvalidRequest(
            "owner must be a user or guest owner key".into(),
        ));
    }
    if !app.store.is_home(&request.from_shard) {
        return Err(ApiError::Misdirected);
    }
    let answer = match step {
        forward::moves::Step::Freeze => serde_json::to_vec(
            &moves::freeze(
                &app.store,
                &request.from_shard,
                &request.owner,
                &request.to_shard,
            )
            .await?,
        ),
        forward::moves::Step::Mark => {
            let marked = moves::mark(
                &app.store,
                &request.from_shard,
                &request.owner,
                &request.to_shard,
            )
            .await?;
            serde_json::to_vec(&forward::moves::Marked { marked })
        }
    };
    let answer = answer.map_err(|error| ApiError::Internal(error.to_string()))?;
    Ok(response::json(StatusCode::OK, answer))
}

/// `POST /internal/v1/parked/add`: an add another region parked while this one was out of its
/// reach, for a cart homed here. It runs as the client's add would have: the same body under
/// the same Idempotency-Key, so an add that reached this region before (its answer lost) or a
/// retry of this call is a replay. The answer is the write's, status and all.
pub async fn parked_add(app: &App, body: &[u8]) -> Result<Response<Body>, ApiError> {
    use super::command::{CartWrite, Change, Placed};
    use crate::domain::ids::{Owner, SessionId, UserId};
    let parked: forward::parked::Request = request::parse_json(body)?;
    let here = app.config.region.id.as_str();
    let key = OwnerKey::from_stored(parked.owner.clone());
    let (owner, placement, home) = match parked.owner.split_once(':') {
        Some(("u", user)) => {
            let user = UserId::parse(user).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
            // A user is placed by its token's region claim, or (no claim) on the global ring;
            // the parking edge placed it one of these two ways.
            let (placement, home) = [Some(here), None]
                .into_iter()
                .filter_map(|home| Some((app.topology().ring.place(key.as_str(), home)?, home)))
                .find(|(p, _)| *p.home == *here && *p.shard == *parked.home_shard)
                .ok_or(ApiError::Misdirected)?;
            (Owner::User(user), placement, home.map(str::to_string))
        }
        Some(("g", session)) => {
            let placement = command::guest_placement(app, &key)?;
            (
                Owner::Guest(SessionId::verified(session.to_string())),
                placement,
                command::guest_home(&key),
            )
        }
        _ => {
            return Err(ApiError::InvalidRequest(
                "owner must be a user or guest owner key".into(),
            ))
        }
    };
    if *placement.home != *here || !app.store.is_home(placement.shard) {
        return Err(ApiError::Misdirected);
    }
    let add_body: request::AddItemBody = request::parse_body(parked.body.as_bytes())?;
    let add = add_body.validate()?;
    let cart = Placed::known(app, owner, key, placement, home.as_deref());
    let write = CartWrite {
        home_currency: cart.currency(app),
        cart,
        new_session: None,
        change: Change::Add(add),
    };
    let body = bytes::Bytes::from(parked.body.into_bytes());
    Box::pin(super::cart::write(
        app,
        write,
        Some(&parked.idempotency_key),
        &body,
    ))
    .await
}

/// `POST /internal/v1/parked/applied`: which of another region's parked adds (by key) a cart
/// homed here holds, read from the shard's primary with the cart's version in one snapshot. A
/// read there asks when its own replica is older than the cart it shows
/// (`parking::in_cart`).
pub async fn parked_applied(app: &App, body: &[u8]) -> Result<Response<Body>, ApiError> {
    use crate::store::parking::{self, RecordsFrom};
    let question: forward::parked::AppliedQuestion = request::parse_json(body)?;
    if !question.owner.starts_with("u:") && !question.owner.starts_with("g:") {
        return Err(ApiError::InvalidRequest(
            "owner must be a user or guest owner key".into(),
        ));
    }
    if i64::try_from(question.keys.len()).map_or(true, |n| n > app.config.parking.max_per_owner) {
        return Err(ApiError::InvalidRequest(format!(
            "at most {} keys (parking.max_per_owner)",
            app.config.parking.max_per_owner
        )));
    }
    if !app.store.is_home(&question.home_shard) {
        return Err(ApiError::Misdirected);
    }
    let owner = OwnerKey::from_stored(question.owner);
    let keys: Vec<&str> = question.keys.iter().map(String::as_str).collect();
    let found = parking::applied_at_home(
        &app.store,
        &question.home_shard,
        &owner,
        &keys,
        RecordsFrom::Primary,
    )
    .await?;
    let answer = forward::parked::AppliedAnswer {
        applied: found
            .applied
            .into_iter()
            .map(|(key, version)| forward::parked::AppliedKey { key, version })
            .collect(),
        cart_version: found.cart_version,
    };
    Ok(response::json(
        StatusCode::OK,
        serde_json::to_vec(&answer).unwrap_or_default(),
    ))
}

/// The guest owner a step names.
pub fn guest_of(step: &MergeStep) -> Result<OwnerKey, ApiError> {
    if !step.guest.starts_with("g:") {
        return Err(ApiError::InvalidRequest(
            "guest must be a guest owner".into(),
        ));
    }
    Ok(OwnerKey::from_stored(step.guest.clone()))
}

/// Runs a merge step on a guest cart homed in this region.
pub async fn run_step(app: &App, step: Step, request: &MergeStep) -> Result<StepAnswer, ApiError> {
    let guest = guest_of(request)?;
    let placement = command::guest_placement(app, &guest)?;
    if *placement.home != app.config.region.id {
        return Err(ApiError::Misdirected);
    }
    // A guest cart the ring is moving is moved before any merge step touches it.
    if let Some(from) = command::guest_moving_from(app, &guest) {
        super::moves::ensure_moved(app, &guest, from, placement.shard).await?;
    }
    let done = StepAnswer {
        status: StepStatus::Ok,
        version: request.version,
        cart: None,
    };
    match step {
        Step::Freeze => {
            let outcome = merge::freeze(
                &app.store,
                placement.shard,
                &guest,
                &request.user,
                request.user_shard.as_deref(),
            )
            .await?;
            Ok(match outcome {
                FreezeOutcome::Frozen(frozen) => StepAnswer {
                    status: StepStatus::Frozen,
                    version: frozen.version,
                    cart: Some(frozen.cart),
                },
                FreezeOutcome::Busy => StepAnswer {
                    status: StepStatus::Busy,
                    version: 0,
                    cart: None,
                },
            })
        }
        Step::Finalize => {
            let finalized = merge::finalize(
                &app.store,
                placement.shard,
                &guest,
                &request.user,
                request.version,
            )
            .await?;
            if let Some(cart) = finalized {
                app.store.cache.store_committed(&cart).await;
                app.invalidate_elsewhere(&guest, cart.version);
            }
            Ok(done)
        }
        Step::Abort => {
            let lifted = merge::abort(
                &app.store,
                placement.shard,
                &guest,
                &request.user,
                request.version,
            )
            .await?;
            if let Some(cart) = lifted {
                app.store.cache.store_committed(&cart).await;
                app.invalidate_elsewhere(&guest, cart.version);
            }
            Ok(done)
        }
    }
}
