//! A small host: an HTTP API over dvmm, as a portal's back end would run it.
//!
//! ```text
//! cargo run --example host -- --config examples/host.json
//! curl -X POST localhost:8080/tenants/<tenant>/requests -d '{"project_prefix":"web","requested_name":"app01","size":"S","justification":"demo"}'
//! curl -X POST localhost:8080/tenants/<tenant>/requests/<id>/approve
//! curl 'localhost:8080/tenants/<tenant>/requests?status=Ready&limit=20'
//! curl localhost:8080/metrics
//! ```
//!
//! What it shows:
//! - one service type (`dvmm::any::HostService`) whatever the config file
//!   chooses: memory or PostgreSQL (set up in one call), simulator or a
//!   vCenter;
//! - the runner in the background by handle, its health on `/health`, and a
//!   clean shutdown on Ctrl-C;
//! - requests listed page by page from the read model (`cursor` in, `next`
//!   out);
//! - the metrics in Prometheus text on `/metrics`.
//!
//! The config file (JSON):
//! `{ "listen": "127.0.0.1:8080", "store": {"kind": "memory"} | {"kind":
//! "postgres", "admin_url": .., "login": .., "password": ..}, "vsphere":
//! {"kind": "simulator"} | {"kind": "soap"}, "tenants": [TenantConfig, ..] }`

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use dvmm::any::{AnyVsphere, Backend, HostService};
use dvmm::core::read_model::{Cursor, RequestFilter};
use dvmm::{
    NewVmRequest, ProjectId, RunnerConfig, RunnerExt, RunnerHandle, Secret, ServiceError,
    TenantConfig, TenantId, Tenants, UserId, VmRequestId, VmRequestStatus, VmSize,
};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(about = "A small HTTP host for dvmm")]
struct Args {
    /// The host's configuration file (JSON).
    #[arg(long)]
    config: std::path::PathBuf,
}

#[derive(Deserialize)]
struct Config {
    listen: SocketAddr,
    store: StoreConfig,
    vsphere: VsphereConfig,
    tenants: Vec<TenantConfig>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum StoreConfig {
    Memory,
    Postgres {
        admin_url: String,
        login: String,
        password: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum VsphereConfig {
    Simulator,
    Soap,
}

struct App {
    service: Arc<HostService>,
    runner: RunnerHandle,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| format!("cannot read {}: {e}", args.config.display()))?;
    let config: Config =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", args.config.display()))?;
    let mut tenants = Tenants::new();
    for tenant in config.tenants {
        tenants.insert(tenant).map_err(|e| e.to_string())?;
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;

    let backend = match config.store {
        StoreConfig::Memory => Backend::Memory,
        StoreConfig::Postgres {
            admin_url,
            login,
            password,
        } => Backend::Postgres {
            admin_url,
            login,
            password: Secret::new(password),
        },
    };
    let stores = backend.open().await.map_err(|e| e.to_string())?;
    let vsphere = match config.vsphere {
        VsphereConfig::Simulator => AnyVsphere::simulator(),
        VsphereConfig::Soap => AnyVsphere::soap(dvmm::vsphere::soap::SoapOptions::default()),
    };
    let service = Arc::new(stores.service(vsphere, tenants));
    let runner = stores
        .runner(service.clone(), RunnerConfig::default())
        .map_err(|e| e.to_string())?
        .spawn();
    let app = Arc::new(App {
        service,
        runner,
        metrics,
    });

    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/tenants/{tenant}/requests", post(submit).get(list))
        .route("/tenants/{tenant}/requests/{id}/approve", post(approve))
        .route("/tenants/{tenant}/requests/{id}/timeline", get(timeline))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{address}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| e.to_string())?;
    let Ok(app) = Arc::try_unwrap(app) else {
        return Err("requests still in flight at shutdown".into());
    };
    let report = app.runner.shutdown().await.map_err(|e| e.to_string())?;
    println!(
        "runner stopped: ready={} failed={}",
        report.ready, report.failed
    );
    Ok(())
}

/// A service error as an HTTP answer: the user's part of the message, no
/// internals.
struct ApiError(StatusCode, String);

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        let status = match &error {
            ServiceError::RequestNotFound(_) | ServiceError::UnknownTenant(_) => {
                StatusCode::NOT_FOUND
            }
            ServiceError::InvalidName(_) | ServiceError::Domain(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let health = app.runner.health();
    Json(serde_json::json!({
        "running": health.running,
        "in_flight": health.in_flight,
        "held": health.held,
        "parked_endpoints": health.parked_endpoints,
        // Jobs per state in the whole queue, as the runner last read it.
        "queue": health.queue.map(|counts| {
            counts
                .by_state()
                .into_iter()
                .map(|(state, n)| (state.to_owned(), serde_json::Value::from(n)))
                .collect::<serde_json::Map<_, _>>()
        }),
        "store_failures": health.store_failures,
        "last_error": health.last_error.map(|(at, e)| format!("{at}: {e}")),
        "ready": health.report.ready,
        "failed": health.report.failed,
    }))
}

async fn metrics_text(State(app): State<Arc<App>>) -> String {
    app.metrics.render()
}

#[derive(Deserialize)]
struct SubmitBody {
    project_prefix: String,
    requested_name: String,
    size: VmSize,
    justification: String,
    project_id: Option<ProjectId>,
    requested_by: Option<UserId>,
}

async fn submit(
    State(app): State<Arc<App>>,
    Path(tenant): Path<TenantId>,
    Json(body): Json<SubmitBody>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id = app
        .service
        .submit(NewVmRequest {
            tenant_id: tenant,
            project_id: body.project_id.unwrap_or_else(ProjectId::new_v4),
            project_prefix: body.project_prefix,
            requested_name: body.requested_name,
            size: body.size,
            requested_by: body.requested_by.unwrap_or_else(UserId::new_v4),
            justification: body.justification,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": id }))))
}

async fn approve(
    State(app): State<Arc<App>>,
    Path((tenant, id)): Path<(TenantId, VmRequestId)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = app.service.approve(tenant, id, UserId::new_v4()).await?;
    Ok(Json(
        serde_json::json!({ "id": id, "status": request.status }),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<VmRequestStatus>,
    project: Option<ProjectId>,
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(app): State<Arc<App>>,
    Path(tenant): Path<TenantId>,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let after = match query.cursor.as_deref().map(str::parse::<Cursor>) {
        None => None,
        Some(Ok(cursor)) => Some(cursor),
        Some(Err(e)) => return Err(ApiError(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let filter = RequestFilter {
        status: query.status,
        project_id: query.project,
    };
    let page = app
        .service
        .list_requests_page(tenant, &filter, after, query.limit.unwrap_or(20).min(200))
        .await?;
    Ok(Json(serde_json::json!({
        "items": page.items,
        "next": page.next.map(|c| c.to_string()),
    })))
}

async fn timeline(
    State(app): State<Arc<App>>,
    Path((tenant, id)): Path<(TenantId, VmRequestId)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let entries = app.service.timeline(tenant, id).await?;
    Ok(Json(serde_json::json!(entries)))
}
