//! A small multi-tenant HTTP service built on tenant-scale-client and axum.
//!
//! Every `/api` request names its company in the `X-Company-Id` header. The service looks up the
//! company's plan (cached), applies the plan's rate limit (headers on every response, 429 when
//! refused), reads through the cache from a replica, pages with the extension's keyset pagination,
//! and writes on the primary, turning the extension's quota error into 402 with the upgrade hint.
//! `/health` and `/admin/...` serve what an operator looks at, from the extension's views.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/ \
//!   cargo run -p tenant-scale-client --example service          # listens on LISTEN (127.0.0.1:3000)
//! curl -H 'X-Company-Id: acme' -d '{"name": "first"}' -H 'Content-Type: application/json' localhost:3000/api/items
//! ```
//! The service creates its `items` table if missing; quotas on it are the DBA's call
//! (`tenant_scale.enforce_quota('items', 'items', 'company_id')`, as scripts/demo does).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tenant_scale_client::RedisConfig;
use tenant_scale_client::cache::{Cache, CacheConfig};
use tenant_scale_client::pagination::{Page, PageRequest};
use tenant_scale_client::pool::{Error as PoolError, PoolConfig, TenantPool};
use tenant_scale_client::ratelimit::{RateLimitConfig, RateLimiter};

struct App {
    pool: TenantPool,
    cache: Cache,
    limiter: RateLimiter,
}

type Shared = Arc<App>;

/// The company of an `/api` request.
#[derive(Clone)]
struct Tenant {
    company: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Item {
    id: i64,
    name: String,
    created_at: String,
}

#[derive(Deserialize)]
struct NewItem {
    name: String,
}

#[derive(Deserialize)]
struct ListQuery {
    cursor: Option<String>,
}

/// Errors as JSON bodies with a status.
struct Failure(StatusCode, Value);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

impl From<PoolError> for Failure {
    fn from(error: PoolError) -> Self {
        match error.quota() {
            Some(quota) => Failure(
                StatusCode::PAYMENT_REQUIRED,
                json!({
                    "error": quota.message,
                    "company": quota.company,
                    "resource": quota.resource,
                    "plan": quota.plan,
                    "limit": quota.limit,
                    "used": quota.used,
                    "upgrade_plan": quota.upgrade_plan,
                    "upgrade_limit": quota.upgrade_limit,
                    "hint": quota.hint,
                }),
            ),
            None => Failure(StatusCode::SERVICE_UNAVAILABLE, json!({"error": error.to_string()})),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis =
        RedisConfig::new(&std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()));
    let pool = TenantPool::connect(PoolConfig::from_env()?).await?;
    pool.write(None)
        .await?
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS items (id bigserial PRIMARY KEY, company_id text NOT NULL, \
             name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now()); \
             CREATE INDEX IF NOT EXISTS items_company_created ON items (company_id, created_at, id)",
        )
        .await?;
    let app = Arc::new(App {
        pool,
        cache: Cache::new(CacheConfig::new(redis.clone()))?,
        limiter: RateLimiter::new(redis, RateLimitConfig::default())?,
    });

    let api = Router::new()
        .route("/items", get(list_items).post(create_item))
        .route("/items/{id}", get(get_item))
        .layer(middleware::from_fn_with_state(app.clone(), tenant_and_rate_limit));
    let router = Router::new()
        .nest("/api", api)
        .route("/health", get(health))
        .route("/admin/companies/{company}/metrics", get(company_metrics))
        .route("/admin/companies/{company}/quota", get(company_quota))
        .route("/admin/problems", get(problem_companies))
        .route("/admin/cache", get(cache_stats))
        .with_state(app.clone());

    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("service: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await?;
    // Requests have drained; give connections still checked out a moment, then close every pool.
    app.pool.close(Duration::from_secs(5)).await?;
    println!("service: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// `X-Company-Id` -> company and plan; then the plan's rate limit, whose headers go on the response.
async fn tenant_and_rate_limit(State(app): State<Shared>, mut request: Request, next: Next) -> Response {
    let Some(company) = request.headers().get("x-company-id").and_then(|value| value.to_str().ok()) else {
        return Failure(StatusCode::BAD_REQUEST, json!({"error": "the X-Company-Id header is required"}))
            .into_response();
    };
    let company = company.to_string();
    let plan = match plan_of(&app, &company).await {
        Ok(plan) => plan,
        Err(failure) => return failure.into_response(),
    };
    let limiter = (request.method() == axum::http::Method::POST).then_some("upload");
    let decision = match app.limiter.check(&company, &plan, limiter).await {
        Ok(decision) => decision,
        Err(error) => {
            return Failure(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": error.to_string()}))
                .into_response();
        }
    };
    let mut response = if decision.allowed {
        request.extensions_mut().insert(Tenant { company });
        next.run(request).await
    } else {
        Failure(StatusCode::TOO_MANY_REQUESTS, json!({"error": "rate limit exceeded", "plan": plan}))
            .into_response()
    };
    add_headers(response.headers_mut(), &decision.headers());
    response
}

fn add_headers(headers: &mut HeaderMap, pairs: &[(&'static str, String)]) {
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value))
        {
            headers.insert(name, value);
        }
    }
}

/// The company's plan (the extension's default plan when the company is not registered), cached for
/// 60 s: plans are changed by the DBA, not by this service, so there is no write here to invalidate on,
/// and a plan change reaches requests within that TTL (plus the replica's lag).
async fn plan_of(app: &App, company: &str) -> Result<String, Failure> {
    app.cache
        .get_or_set(company, "plan", "plan", Some(Duration::from_secs(60)), || async {
            let connection = app.pool.read(Some(company)).await?;
            let row = connection
                .query_one(
                    "SELECT coalesce((SELECT plan FROM tenant_scale.companies WHERE company_id = $1), \
                     current_setting('tenant_scale.default_plan'))",
                    &[&company],
                )
                .await?;
            Ok::<String, PoolError>(row.get(0))
        })
        .await
        .map_err(Failure::from)
}

async fn list_items(
    State(app): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Page<Item>>, Failure> {
    let connection = app.pool.read(Some(&tenant.company)).await?;
    let request = PageRequest {
        relation: "items",
        order_by: &["created_at desc"],
        page_size: 5,
        filter: json!({"company_id": tenant.company}),
    };
    Page::fetch(&connection, &request, query.cursor.as_deref())
        .await
        .map(Json)
        .map_err(|error| Failure(StatusCode::BAD_REQUEST, json!({"error": error.to_string()})))
}

/// Why an item could not be served; a loader error is never cached.
enum ItemError {
    NotFound,
    Database(PoolError),
}

/// One item, cached. Items are never changed once created, so a row read from a replica is never stale;
/// an id not found there may just not have replicated yet (reads can lag by up to `max_replica_lag`),
/// so "not found" is a loader error, answered 404 and not cached: the next request looks again.
async fn get_item(
    State(app): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Path(id): Path<i64>,
) -> Result<Json<Item>, Failure> {
    let item = app
        .cache
        .get_or_set(&tenant.company, "items", &id.to_string(), None, || async {
            let connection = app.pool.read(Some(&tenant.company)).await.map_err(ItemError::Database)?;
            let row = connection
                .query_opt(
                    "SELECT id, name, created_at::text FROM items WHERE company_id = $1 AND id = $2",
                    &[&tenant.company, &id],
                )
                .await
                .map_err(ItemError::Database)?
                .ok_or(ItemError::NotFound)?;
            Ok(Item { id: row.get(0), name: row.get(1), created_at: row.get(2) })
        })
        .await;
    match item {
        Ok(item) => Ok(Json(item)),
        Err(ItemError::NotFound) => {
            Err(Failure(StatusCode::NOT_FOUND, json!({"error": "no such item", "id": id})))
        }
        Err(ItemError::Database(error)) => Err(error.into()),
    }
}

async fn create_item(
    State(app): State<Shared>,
    Extension(tenant): Extension<Tenant>,
    Json(new): Json<NewItem>,
) -> Result<(StatusCode, Json<Item>), Failure> {
    let connection = app.pool.write(Some(&tenant.company)).await?;
    let row = connection
        .query_one(
            "INSERT INTO items (company_id, name) VALUES ($1, $2) RETURNING id, name, created_at::text",
            &[&tenant.company, &new.name],
        )
        .await?;
    // The namespace `get_item` caches under: a write forgets the company's cached items, so routes that
    // change items (and lists, were they cached) never serve what was read before it.
    app.cache.invalidate_namespace(&tenant.company, "items").await;
    Ok((StatusCode::CREATED, Json(Item { id: row.get(0), name: row.get(1), created_at: row.get(2) })))
}

async fn health(State(app): State<Shared>) -> (StatusCode, Json<Value>) {
    let nodes = app.pool.health().await;
    let primary_up =
        nodes.iter().any(|node| node.up && node.role == tenant_scale_client::pool::Role::Primary);
    let nodes: Vec<Value> = nodes
        .iter()
        .map(|node| {
            json!({
                "name": node.name, "role": format!("{:?}", node.role).to_lowercase(), "up": node.up,
                "serves_reads": node.serves_reads, "banned": node.banned,
                "lag_ms": node.lag.map(|lag| lag.as_millis() as u64), "last_error": node.last_error,
                "pool": {"size": node.size, "max": node.max_size, "in_use": node.in_use, "waiting": node.waiting},
                "attributions": {"sent": node.attributions_sent, "skipped": node.attributions_skipped},
            })
        })
        .collect();
    let cache = app.cache.health();
    let status = if primary_up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        Json(json!({
            "database": nodes,
            "cache": {"redis_up": cache.redis.up, "outages": cache.redis.outages, "fallback_entries": cache.fallback_entries},
            "rate_limit": {"redis_up": app.limiter.health().up},
        })),
    )
}

/// Rows of an extension view or function as a JSON array, run unattributed on the primary.
async fn rows_as_json(app: &App, sql: &str, company: Option<&str>) -> Result<Json<Value>, Failure> {
    let connection = app.pool.write(None).await?;
    let query = format!("SELECT coalesce(jsonb_agg(to_jsonb(r)), '[]') FROM ({sql}) r");
    let row = match company {
        Some(company) => connection.query_one(query.as_str(), &[&company]).await?,
        None => connection.query_one(query.as_str(), &[]).await?,
    };
    Ok(Json(row.get(0)))
}

async fn company_metrics(
    State(app): State<Shared>,
    Path(company): Path<String>,
) -> Result<Json<Value>, Failure> {
    rows_as_json(&app, "SELECT * FROM tenant_scale.company_stats WHERE company_id = $1", Some(&company)).await
}

async fn company_quota(
    State(app): State<Shared>,
    Path(company): Path<String>,
) -> Result<Json<Value>, Failure> {
    rows_as_json(&app, "SELECT * FROM tenant_scale.quota_status($1)", Some(&company)).await
}

async fn problem_companies(State(app): State<Shared>) -> Result<Json<Value>, Failure> {
    rows_as_json(&app, "SELECT * FROM tenant_scale.problem_companies", None).await
}

async fn cache_stats(State(app): State<Shared>) -> Json<Value> {
    let stats = app.cache.stats();
    let per_company: serde_json::Map<String, Value> = stats
        .companies
        .iter()
        .map(|(company, counters)| {
            (
                company.clone(),
                json!({"hits": counters.hits, "misses": counters.misses, "hit_rate": counters.hit_rate()}),
            )
        })
        .collect();
    Json(json!({
        "hits": stats.total.hits, "misses": stats.total.misses, "errors": stats.total.errors,
        "fallback_uses": stats.total.fallback_uses, "hit_rate": stats.total.hit_rate(), "companies": per_company,
        "other_companies": {"hits": stats.other.hits, "misses": stats.other.misses, "hit_rate": stats.other.hit_rate()},
    }))
}
